"""Reliability against a real uvicorn process on loopback, on SQLite and PostgreSQL: 20 annotators x 50 votes
store exactly 1,000 votes even though the server is killed with `kill -9` in the middle of that load and
restarted (no acknowledged vote lost, no retried submission stored twice); a retried POST with the same
client_id is stored once. One load run covers both claims (a clean run is the same run without the kill,
and its exact count is the weaker claim). All loops are bounded (attempts and a deadline)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from sqlalchemy import func, select

from preflab.collect import store
from preflab.collect.db import Vote, open_database

from .support import bearer, new_project

ANNOTATORS, VOTES_EACH = 20, 50


def setup_load(tmp_path, db_url):
    """1,000 pairs x overlap 1: every annotator always finds a pair; 20 tokens."""
    project = new_project(tmp_path / "load", db_url, n_pairs=ANNOTATORS * VOTES_EACH, overlap=1)
    engine, sessions = open_database(project.db_url)
    with sessions() as s:
        tokens = [store.create_annotator(s, name=f"p{i:02d}")[1] for i in range(ANNOTATORS)]
    return project, engine, sessions, tokens


def annotate(url: str, token: str, n: int, acked: list, deadline: float, errors: list) -> None:
    """Vote n times, retrying each submission with its client_id through connection failures."""
    with httpx.Client(base_url=url, headers=bearer(token), timeout=10) as http:
        done = 0
        while done < n and time.monotonic() < deadline:
            try:
                pair = http.get("/api/next")
                if pair.status_code != 200:
                    errors.append(pair.text)
                    return
                pair_id = pair.json()["pair_id"]
                client_id = f"{token[:8]}-{done}"
                for _ in range(200):  # the same submission until it is acknowledged
                    try:
                        r = http.post("/api/votes", json={"pair_id": pair_id, "choice": "left", "client_id": client_id})
                    except httpx.TransportError:
                        if time.monotonic() > deadline:
                            return
                        time.sleep(0.1)
                        continue
                    if r.status_code in (200, 201):
                        acked.append((token, r.json()["id"], client_id))
                        done += 1
                    else:
                        errors.append(f"{r.status_code} {r.text}")
                        return
                    break
            except httpx.TransportError:
                time.sleep(0.1)


def run_load(url, tokens, acked, errors, seconds=90.0) -> list[threading.Thread]:
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=annotate, args=(url, t, VOTES_EACH, acked, deadline, errors)) for t in tokens]
    for t in threads:
        t.start()
    return threads


def stored(sessions) -> dict:
    with sessions() as s:
        return {v.id: v for v in s.scalars(select(Vote))}


@pytest.mark.slow
def test_1000_votes_from_20_annotators_through_a_kill_9_lose_nothing(tmp_path, db_url, server_factory):
    project, engine, sessions, tokens = setup_load(tmp_path, db_url)
    server = server_factory(project.dir, db_url).start()
    acked, errors = [], []
    threads = run_load(server.url, tokens, acked, errors)
    deadline = time.monotonic() + 60
    while len(acked) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill9()  # mid-load: requests in flight die with the process
    at_kill = len(acked)
    assert 300 <= at_kill < 1000
    time.sleep(0.5)
    server.start()  # the same port: the clients' retries find it again
    for t in threads:
        t.join(120)
    assert errors == []
    votes = stored(sessions)
    assert all(vote_id in votes for _, vote_id, _ in acked)  # every acknowledged vote survived
    # and retries after the restart were stored once: exactly one vote per submission
    assert len(votes) == len(acked) == 1000
    with sessions() as s:
        assert s.scalar(select(func.count(func.distinct(Vote.client_id)))) == 1000
    engine.dispose()


@pytest.mark.slow
def test_retried_post_is_stored_once_over_http(tmp_path, db_url, server_factory):
    project = new_project(tmp_path / "retry", db_url, n_pairs=3, overlap=1)
    engine, sessions = open_database(project.db_url)
    with sessions() as s:
        token = store.create_annotator(s, name="ana")[1]
    server = server_factory(project.dir, db_url).start()
    with httpx.Client(base_url=server.url, headers=bearer(token), timeout=10) as http:
        pair_id = http.get("/api/next").json()["pair_id"]
        body = {"pair_id": pair_id, "choice": "tie", "client_id": "retry-me"}
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(http.post("/api/votes", json=body))) for _ in range(5)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(r.status_code for r in results) == [200, 200, 200, 200, 201]
        assert len({r.json()["id"] for r in results}) == 1
    with sessions() as s:
        assert [(v.pair_id, v.choice, v.client_id) for v in s.scalars(select(Vote))] == [(pair_id, "tie", "retry-me")]
    engine.dispose()
