"""The collection database: tables, the engine (SQLite in WAL mode or PostgreSQL) and the schema migrations.

One schema for both back-ends, written as plain portable DDL in `MIGRATIONS` (a numbered list, applied in
order inside one transaction each, the version kept in `meta`). A fresh database runs every step from 0, so
an old project and a new one reach the same tables by the same path; a newer database than this code knows
is refused rather than guessed at. The ORM classes below mirror the final schema (a test checks they agree).

Durability: a vote is acknowledged only after its transaction commits. SQLite runs in WAL mode with
`synchronous=FULL` (the commit is on disk before the reply) and `BEGIN IMMEDIATE` transactions (a writer
takes the lock up front, so concurrent requests queue on `busy_timeout` instead of failing on a stale
snapshot). PostgreSQL relies on its own commit durability and the unique constraints below.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import Float, ForeignKey, Integer, String, Text, create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class SchemaError(RuntimeError):
    """The database cannot be used by this version of preflab (e.g. it was made by a newer one)."""


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Pair(Base):
    """Two responses to one prompt, to be compared by `overlap` annotators. `assigned` counts the annotators
    who were given the pair (checked and raised in one UPDATE, so concurrent requests never exceed overlap)."""

    __tablename__ = "pairs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)  # JSON: a string or a list of chat messages
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(200))  # file:line the pair came from
    assigned: Mapped[int] = mapped_column(Integer, default=0)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)  # v2: active-sampling disagreement (BALD)
    created_at: Mapped[float] = mapped_column(Float)


class Annotator(Base):
    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the token; the token is never stored
    is_admin: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)


class Assignment(Base):
    """A pair given to an annotator, with the sides it is shown in (randomised per annotator and pair)."""

    __tablename__ = "assignments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"))
    left_is_a: Mapped[int] = mapped_column(Integer)  # 1: response_a shown on the left
    rule: Mapped[str] = mapped_column(String(16), default="random")  # v2: how the pair was picked
    created_at: Mapped[float] = mapped_column(Float)


class Vote(Base):
    __tablename__ = "votes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"))
    choice: Mapped[str] = mapped_column(String(16))  # left, right, tie, both_bad (as the annotator saw it)
    left_is_a: Mapped[int] = mapped_column(Integer)
    rationale: Mapped[str] = mapped_column(Text, default="")
    client_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    rule: Mapped[str] = mapped_column(String(16), default="random")  # v2
    shown_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class Authored(Base):
    """A comparison written by a person (author mode): the prompt, both responses, the label and why."""

    __tablename__ = "authored"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    prompt: Mapped[str] = mapped_column(Text)
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    teaches: Mapped[str] = mapped_column(Text)
    bias: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class TrainJob(Base):
    """A live reward-model training run in a background process."""

    __tablename__ = "train_jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # running, done, failed
    votes: Mapped[int] = mapped_column(Integer, default=0)
    held_out: Mapped[int] = mapped_column(Integer, default=0)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    run_dir: Mapped[str] = mapped_column(Text, default="")
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


def _v1(dialect: str) -> list[str]:
    pk = "INTEGER PRIMARY KEY AUTOINCREMENT" if dialect == "sqlite" else "SERIAL PRIMARY KEY"
    real = "REAL" if dialect == "sqlite" else "DOUBLE PRECISION"
    return [
        "CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)",
        f"CREATE TABLE pairs (id {pk}, prompt TEXT NOT NULL, response_a TEXT NOT NULL, response_b TEXT NOT NULL, "
        f"source VARCHAR(200) NOT NULL, assigned INTEGER NOT NULL DEFAULT 0, created_at {real} NOT NULL)",
        f"CREATE TABLE annotators (id {pk}, name VARCHAR(100) NOT NULL UNIQUE, token_hash VARCHAR(64) NOT NULL UNIQUE, "
        f"is_admin INTEGER NOT NULL DEFAULT 0, created_at {real} NOT NULL)",
        f"CREATE TABLE assignments (id {pk}, annotator_id INTEGER NOT NULL REFERENCES annotators(id), "
        f"pair_id INTEGER NOT NULL REFERENCES pairs(id), left_is_a INTEGER NOT NULL, created_at {real} NOT NULL, "
        "UNIQUE (annotator_id, pair_id))",
        f"CREATE TABLE votes (id {pk}, annotator_id INTEGER NOT NULL REFERENCES annotators(id), "
        "pair_id INTEGER NOT NULL REFERENCES pairs(id), choice VARCHAR(16) NOT NULL, left_is_a INTEGER NOT NULL, "
        f"rationale TEXT NOT NULL DEFAULT '', client_id VARCHAR(100), shown_at {real} NOT NULL, "
        f"created_at {real} NOT NULL, "
        "UNIQUE (annotator_id, pair_id), UNIQUE (annotator_id, client_id))",
        f"CREATE TABLE authored (id {pk}, annotator_id INTEGER NOT NULL REFERENCES annotators(id), "
        "prompt TEXT NOT NULL, chosen TEXT NOT NULL, rejected TEXT NOT NULL, teaches TEXT NOT NULL, "
        f"bias TEXT NOT NULL, created_at {real} NOT NULL)",
        f"CREATE TABLE train_jobs (id {pk}, status VARCHAR(16) NOT NULL, votes INTEGER NOT NULL DEFAULT 0, "
        f"held_out INTEGER NOT NULL DEFAULT 0, accuracy {real}, run_dir TEXT NOT NULL DEFAULT '', "
        "message TEXT NOT NULL DEFAULT '', "
        f"created_at {real} NOT NULL, finished_at {real})",
        "CREATE INDEX votes_pair ON votes (pair_id)",
    ]


def _v2(dialect: str) -> list[str]:
    """Active sampling: a disagreement score per pair, and the rule that picked each pair recorded."""
    real = "REAL" if dialect == "sqlite" else "DOUBLE PRECISION"
    return [
        f"ALTER TABLE pairs ADD COLUMN score {real}",
        "ALTER TABLE assignments ADD COLUMN rule VARCHAR(16) NOT NULL DEFAULT 'random'",
        "ALTER TABLE votes ADD COLUMN rule VARCHAR(16) NOT NULL DEFAULT 'random'",
    ]


MIGRATIONS = [_v1, _v2]  # step i takes the schema from version i to i + 1
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(engine: Engine) -> int:
    """The version stored in the database (0 for an empty database)."""
    with engine.connect() as conn:
        try:
            row = conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).first()
        except Exception:  # no meta table yet: an empty database
            return 0
    return int(row[0]) if row else 0


def migrate(engine: Engine, target: int = SCHEMA_VERSION) -> int:
    """Apply the missing steps up to `target`, one transaction each; returns the version reached."""
    current = schema_version(engine)
    if current > SCHEMA_VERSION:
        raise SchemaError(
            f"the database is at schema version {current}, newer than this preflab knows "
            f"({SCHEMA_VERSION}): upgrade preflab"
        )
    for version in range(current, target):
        with engine.begin() as conn:
            for statement in MIGRATIONS[version](engine.dialect.name):
                conn.execute(text(statement))
            if version == 0:
                conn.execute(text("INSERT INTO meta (key, value) VALUES ('schema_version', '1')"))
            else:
                conn.execute(text("UPDATE meta SET value = :v WHERE key = 'schema_version'"), {"v": str(version + 1)})
    return max(current, target)


def sqlite_url(project_dir: str | Path) -> str:
    return f"sqlite:///{Path(project_dir).resolve() / 'collect.db'}"


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, full sync, a busy timeout, foreign keys and BEGIN IMMEDIATE."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=32, max_overflow=32
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
            cur = dbapi_conn.cursor()
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000", "foreign_keys=ON"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        # One writer at a time anyway: queue this process's transactions on a lock (a fair, prompt wait)
        # rather than on SQLite's busy handler, which sleeps in growing steps (p99 latency over a second under
        # 20 clients). The lock is released as the COMMIT/ROLLBACK is issued; another process still waits on
        # busy_timeout.
        writer = threading.Lock()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            writer.acquire()
            conn.info["writer"] = True
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                _release(conn)
                raise

        @event.listens_for(engine, "commit")
        @event.listens_for(engine, "rollback")
        def _release(conn):
            if conn.info.pop("writer", False):
                writer.release()

        return engine
    return create_engine(url, pool_size=24, max_overflow=16, pool_pre_ping=True)


def open_database(url: str) -> tuple[Engine, sessionmaker]:
    """Engine and session factory for `url`, migrated to the current schema."""
    engine = make_engine(url)
    migrate(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)


def now() -> float:
    return time.time()
