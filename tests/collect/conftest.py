"""Fixtures of the collection app: a project on SQLite or PostgreSQL, an in-process client, a real server.

The database fixture is parametrised over both back-ends. PostgreSQL tests read a server URL from
PREFLAB_TEST_POSTGRES (a role allowed to create databases; `.ci/run` starts one) and make a fresh database
per test. Without the URL they skip locally and FAIL under CI=true, so CI cannot pass without running them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from preflab.collect import store
from preflab.collect.db import open_database
from preflab.collect.project import create_project

POSTGRES = os.environ.get("PREFLAB_TEST_POSTGRES", "")
XSS = "<script>window.__xss = 1</script>"


def make_pairs(n: int) -> list[dict]:
    """n pairs of a short and a long response; pair 2 (index 1) holds a <script> to check escaping."""
    pairs = [{"prompt": f"What is {i} + {i}?", "response_a": f"{2 * i}.",
              "response_b": f"I think it is {2 * i}, but let me explain at some length why that is so.",
              "source": f"pairs.jsonl:{i + 1}"} for i in range(n)]
    for p in pairs[2::3]:  # the longer response is not always response_b (nor first in sorted order)
        p["response_a"], p["response_b"] = p["response_b"], p["response_a"]
    pairs[1]["response_b"] = f"Here: {XSS} done"
    return pairs


def write_pairs(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "source"}) + "\n" for p in make_pairs(n)))
    return path


def _postgres_database(request) -> str:
    if not POSTGRES:
        if os.environ.get("CI") == "true":
            pytest.fail("PREFLAB_TEST_POSTGRES is not set under CI: .ci/run must start PostgreSQL")
        pytest.skip("PREFLAB_TEST_POSTGRES not set (start PostgreSQL and export it to run these)")
    from sqlalchemy import create_engine, text

    name = f"preflab_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop():
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    request.addfinalizer(drop)
    return POSTGRES.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request):
    return request.param


@pytest.fixture
def db_url(backend, request, tmp_path) -> str:
    """'' for SQLite in the project folder, else a fresh PostgreSQL database's URL."""
    return "" if backend == "sqlite" else _postgres_database(request)


def new_project(directory: Path, db_url: str, n_pairs: int = 6, overlap: int = 2, **settings):
    project = create_project(directory, db=db_url, overlap=overlap, **settings)
    engine, sessions = open_database(project.db_url)
    with sessions() as s:
        store.add_pairs(s, pairs=make_pairs(n_pairs))
    engine.dispose()
    return project


@pytest.fixture
def project(tmp_path, db_url):
    return new_project(tmp_path / "proj", db_url)


@pytest.fixture
def sessions(project):
    engine, factory = open_database(project.db_url)
    yield factory
    engine.dispose()


@pytest.fixture
def people(sessions):
    """Tokens of ana, bob (annotators) and root (admin)."""
    out = {}
    with sessions() as s:
        for name, admin in (("ana", False), ("bob", False), ("root", True)):
            out[name] = store.create_annotator(s, name=name, is_admin=admin)[1]
    return out


@pytest.fixture
def client(project, sessions):
    from fastapi.testclient import TestClient

    from preflab.collect.app import create_app

    with TestClient(create_app(project, sessions)) as c:
        yield c


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`preflab collect serve` as a real uvicorn process on loopback, restartable on the same port."""

    def __init__(self, project_dir: Path, db: str = ""):
        self.dir, self.db, self.port, self.proc = project_dir, db, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Server":
        cmd = [sys.executable, "-m", "preflab.cli", "collect", "serve", str(self.dir), "--port", str(self.port)]
        if self.db:
            cmd += ["--db", self.db]
        self.log = open(self.dir / f"server-{time.time():.0f}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {Path(self.log.name).read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start in time")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.log.close()


@pytest.fixture
def server_factory():
    servers = []

    def make(project_dir: Path, db: str = "") -> Server:
        servers.append(Server(project_dir, db))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()
