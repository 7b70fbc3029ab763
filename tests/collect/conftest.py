"""Fixtures of the collection app: a project on SQLite or PostgreSQL, an in-process client, a real server.

The database fixture is parametrised over both back-ends. PostgreSQL tests read a server URL from
PREFLAB_TEST_POSTGRES (a role allowed to create databases; `.ci/run` starts one) and make a fresh database
per test. Without the URL they skip locally and FAIL under CI=true, so CI cannot pass without running them.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from preflab.collect import store
from preflab.collect.db import open_database

from .support import Server, new_project

POSTGRES = os.environ.get("PREFLAB_TEST_POSTGRES", "")


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


@pytest.fixture
def server_factory():
    servers = []

    def make(project_dir: Path, db: str = "") -> Server:
        servers.append(Server(project_dir, db))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def browser():
    """Debian's chromium driven by Playwright (its own browser download is never used)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed under CI: .ci/run must install it")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
