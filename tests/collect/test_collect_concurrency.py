"""More annotators at once than the server has worker threads: every request is answered (found by the soak run:
50 clients against the 40 default worker threads stalled, since a request holding SQLite's writer lock waited
for a thread to reach its commit)."""

from __future__ import annotations

import threading

import httpx
import pytest

from preflab.collect import store
from preflab.collect.db import open_database

from .support import bearer, new_project

CLIENTS = 60  # above anyio's default of 40 worker threads


@pytest.mark.slow
def test_more_concurrent_clients_than_default_worker_threads_all_get_answers(tmp_path, db_url, server_factory):
    project = new_project(tmp_path / "p", db_url, n_pairs=2 * CLIENTS, overlap=1)
    engine, sessions = open_database(project.db_url)
    with sessions() as s:
        tokens = [store.create_annotator(s, name=f"c{i:02d}")[1] for i in range(CLIENTS)]
    server = server_factory(project.dir, db_url).start()
    results, start = [], threading.Barrier(CLIENTS)

    def client(token):
        with httpx.Client(base_url=server.url, headers=bearer(token), timeout=20) as http:
            start.wait()
            try:
                pair = http.get("/api/next").json()
                r = http.post("/api/votes", json={"pair_id": pair["pair_id"], "choice": "tie", "client_id": "x"})
                results.append(r.status_code)
            except httpx.TransportError as exc:
                results.append(repr(exc))

    threads = [threading.Thread(target=client, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(map(str, results)) == ["201"] * CLIENTS
    engine.dispose()
