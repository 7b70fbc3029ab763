"""The JSON API fuzzed from its own OpenAPI schema (schemathesis): whatever a client sends, the server answers
without a 500 and without hanging, on SQLite and PostgreSQL, as an annotator and as an admin."""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, given, settings

from preflab.collect.app import create_app

from .support import bearer

EXAMPLES = int(os.environ.get("PREFLAB_FUZZ_EXAMPLES", "15"))  # more with PREFLAB_FUZZ_EXAMPLES=500


def operations(project, sessions) -> list:
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(project, sessions))
    return [result.ok() for result in schema.get_all_operations()]


def test_no_request_gets_a_server_error_or_hangs(project, sessions, people):
    ops = operations(project, sessions)
    assert {f"{op.method.upper()} {op.path}" for op in ops} >= {
        "GET /api/next",
        "POST /api/votes",
        "GET /api/votes",
        "GET /api/stats",
    }
    for op in ops:
        # admin paths as the admin (so they run past the auth check), the rest as an annotator; a fuzzer never
        # starts the live reward model's training worker (a real background training run)
        starts_training = op.method.upper() == "POST" and op.path.endswith("/train")
        who = "root" if "/admin" in op.path and not starts_training else "ana"

        @settings(
            max_examples=EXAMPLES,
            deadline=10_000,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy())
        def call(case):
            response = case.call(headers=bearer(people[who]))
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
            if response.status_code >= 400:  # every failure says what was wrong, in JSON
                body = response.json()
                assert "detail" in body or "error" in body, body

        call()


def test_unauthenticated_calls_are_refused_with_json(client):
    for method, path in (
        ("GET", "/api/next"),
        ("POST", "/api/votes"),
        ("GET", "/api/votes"),
        ("GET", "/api/stats"),
        ("GET", "/api/admin/summary"),
    ):
        r = client.request(method, path)
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["content-type"].startswith("application/json")


def test_text_no_database_can_store_is_a_422_not_a_500(client, people):
    """Found by the fuzzer above: a NUL character in client_id was a 500 on PostgreSQL."""
    pair = client.get("/api/next", headers=bearer(people["ana"])).json()
    for body in (
        {"pair_id": pair["pair_id"], "choice": "tie", "client_id": "\x00"},
        {"pair_id": pair["pair_id"], "choice": "tie", "rationale": "a\x00b"},
    ):
        r = client.post("/api/votes", json=body, headers=bearer(people["ana"]))
        assert r.status_code == 422 and "NUL" in r.text, r.text
    r = client.post(
        "/api/votes",
        content=b'{"pair_id": 1, "choice": "tie", "rationale": "\\ud800"}',
        headers={**bearer(people["ana"]), "content-type": "application/json"},
    )
    assert r.status_code == 422 and "rationale" in r.text, r.text  # a lone surrogate: no valid text
