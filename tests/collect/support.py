"""Helpers of the collection app's tests (and bench/collect_load.py): pairs, projects, a real server.

Kept out of conftest.py so that this folder adds no second module named `conftest` (other tests import theirs).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from preflab.collect import store
from preflab.collect.db import open_database
from preflab.collect.project import create_project

XSS = "<script>window.__xss = 1</script>"


def make_pairs(n: int) -> list[dict]:
    """n pairs of a short and a long response; pair 2 (index 1) holds a <script> to check escaping."""
    pairs = [
        {
            "prompt": f"What is {i} + {i}?",
            "response_a": f"{2 * i}.",
            "response_b": f"I think it is {2 * i}, but let me explain at some length why that is so.",
            "source": f"pairs.jsonl:{i + 1}",
        }
        for i in range(n)
    ]
    for p in pairs[2::3]:  # the longer response is not always response_b (nor first in sorted order)
        p["response_a"], p["response_b"] = p["response_b"], p["response_a"]
    pairs[1]["response_b"] = f"Here: {XSS} done"
    return pairs


def write_pairs(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "source"}) + "\n" for p in make_pairs(n)))
    return path


def new_project(directory: Path, db_url: str, n_pairs: int = 6, overlap: int = 2, **settings):
    project = create_project(directory, db=db_url, overlap=overlap, **settings)
    engine, sessions = open_database(project.db_url)
    with sessions() as s:
        store.add_pairs(s, pairs=make_pairs(n_pairs))
    engine.dispose()
    return project


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

    def start(self, timeout: float = 30.0) -> Server:
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
