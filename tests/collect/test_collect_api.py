"""The JSON API in process (TestClient), on SQLite and PostgreSQL: voting, overlap, idempotency, who sees what,
and that malformed or hostile requests get a 4xx JSON answer, never a 500."""

from __future__ import annotations

import json
import re

from sqlalchemy import select

from preflab.collect.db import Annotator, Assignment, Pair, Vote

from .support import XSS, bearer


def next_pair(client, token):
    r = client.get("/api/next", headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()


def vote(client, token, pair_id, choice="left", **extra):
    return client.post("/api/votes", headers=bearer(token), json={"pair_id": pair_id, "choice": choice, **extra})


def test_next_vote_stats_and_own_votes(client, people, sessions):
    ana, bob = people["ana"], people["bob"]
    first = next_pair(client, ana)
    assert set(first) >= {"pair_id", "prompt", "left", "right"} and not first["done"]
    assert next_pair(client, ana)["pair_id"] == first["pair_id"]  # the same pair until it is voted on
    r = vote(client, ana, first["pair_id"], "right", rationale="shorter and right")
    assert r.status_code == 201
    body = r.json()
    assert body["choice"] == "right" and body["rationale"] == "shorter and right" and body["stored"] is True
    # the shown order is recorded: "left" in the answer is the text shown on the left
    with sessions() as s:
        stored = s.scalar(select(Vote))
        shown = s.scalar(select(Assignment).where(Assignment.pair_id == first["pair_id"]))
        assert (stored.pair_id, stored.choice, stored.left_is_a) == (first["pair_id"], "right", shown.left_is_a)
    with sessions() as s:
        pair = s.get(Pair, first["pair_id"])
    assert first["left"] == (pair.response_a if shown.left_is_a else pair.response_b)
    assert client.get("/api/stats", headers=bearer(ana)).json() == {"collected": 1, "mine": 1, "authored": 0}
    assert client.get("/api/stats", headers=bearer(bob)).json() == {"collected": 1, "mine": 0, "authored": 0}
    assert [v["pair_id"] for v in client.get("/api/votes", headers=bearer(ana)).json()] == [first["pair_id"]]
    assert client.get("/api/votes", headers=bearer(bob)).json() == []  # bob cannot see ana's votes


def test_overlap_and_nobody_sees_a_pair_twice(client, people, sessions):
    # 6 pairs, overlap 2: ana and bob each get all 6 once, then root gets nothing
    seen = {}
    for name in ("ana", "bob"):
        seen[name] = []
        while not (p := next_pair(client, people[name]))["done"]:
            seen[name].append(p["pair_id"])
            assert vote(client, people[name], p["pair_id"], "tie").status_code == 201
    assert sorted(seen["ana"]) == sorted(seen["bob"]) == [1, 2, 3, 4, 5, 6]
    assert next_pair(client, people["root"]) == {
        "done": True,
        "pair_id": None,
        "prompt": None,
        "left": None,
        "right": None,
        "rule": None,
    }
    with sessions() as s:
        sides = [a.left_is_a for a in s.scalars(select(Assignment))]
    assert len(sides) == 12 and 0 < sum(sides) < 12  # sides are randomised (P(all same) = 2^-11)


def test_retry_with_client_id_is_stored_once_and_second_vote_refused(client, people, sessions):
    p = next_pair(client, people["ana"])
    a = vote(client, people["ana"], p["pair_id"], client_id="c-1")
    b = vote(client, people["ana"], p["pair_id"], client_id="c-1")
    assert (a.status_code, b.status_code) == (201, 200)
    assert a.json()["id"] == b.json()["id"] and b.json()["stored"] is False
    c = vote(client, people["ana"], p["pair_id"], "right", client_id="c-2")
    assert c.status_code == 409 and "already voted" in c.json()["detail"]
    other = next_pair(client, people["ana"])
    d = vote(client, people["ana"], other["pair_id"], client_id="c-1")  # the id of another submission
    assert d.status_code == 409 and "c-1" in d.json()["detail"]
    with sessions() as s:
        assert len(s.scalars(select(Vote)).all()) == 1


def test_voting_needs_the_pair_to_be_given_to_you(client, people):
    p = next_pair(client, people["ana"])
    r = vote(client, people["bob"], p["pair_id"])  # bob never asked for a pair
    assert r.status_code == 409 and "GET /api/next" in r.json()["detail"]
    r = vote(client, people["ana"], 999)
    assert r.status_code == 404 and r.json() == {"detail": "no pair 999"}


def test_malformed_requests_get_4xx_json(client, people):
    ana = people["ana"]
    p = next_pair(client, ana)
    h = {**bearer(ana), "Content-Type": "application/json"}
    cases = [
        ("POST", "/api/votes", {"content": b"{not json", "headers": h}, 422),
        ("POST", "/api/votes", {"content": b"[1, 2]", "headers": h}, 422),
        ("POST", "/api/votes", {"json": {"pair_id": p["pair_id"], "choice": "middle"}, "headers": h}, 422),
        ("POST", "/api/votes", {"json": {"pair_id": "x", "choice": "left"}, "headers": h}, 422),
        ("POST", "/api/votes", {"json": {"pair_id": -3, "choice": "left"}, "headers": h}, 422),
        ("POST", "/api/votes", {"json": {"pair_id": 10**30, "choice": "left"}, "headers": h}, 422),
        ("POST", "/api/votes", {"json": {"choice": "left"}, "headers": h}, 422),
        ("POST", "/api/votes", {"json": {"pair_id": p["pair_id"], "choice": "left", "admin": True}, "headers": h}, 422),
        (
            "POST",
            "/api/votes",
            {"json": {"pair_id": p["pair_id"], "choice": "left", "rationale": "x" * 5000}, "headers": h},
            422,
        ),
        ("POST", "/api/votes", {"content": b"\xff\xfe\x00", "headers": h}, 400),
        (
            "POST",
            "/api/votes",
            {
                "content": b"pair_id=1&choice=left",
                "headers": {**bearer(ana), "Content-Type": "application/x-www-form-urlencoded"},
            },
            422,
        ),
        ("POST", "/api/votes", {"content": b"x" * 70_000, "headers": h}, 413),
        ("POST", "/api/votes", {"content": iter([b"x" * 40_000] * 2), "headers": h}, 413),  # chunked, no length
        ("POST", "/api/votes", {"json": {"pair_id": p["pair_id"], "choice": "left"}}, 401),
        (
            "POST",
            "/api/votes",
            {"json": {"pair_id": p["pair_id"], "choice": "left"}, "headers": {"Authorization": "Basic abc"}},
            401,
        ),
        ("GET", "/api/next", {"headers": bearer("not-a-token")}, 401),
        ("GET", "/api/nothing-here", {"headers": h}, 404),
        ("DELETE", "/api/votes", {"headers": h}, 405),
        (
            "POST",
            "/api/authored",
            {"json": {"prompt": "p", "better": "a", "worse": "a", "teaches": "t"}, "headers": h},
            422,
        ),
        (
            "POST",
            "/api/authored",
            {"json": {"prompt": "", "better": "a", "worse": "b", "teaches": "t"}, "headers": h},
            422,
        ),
        ("GET", "/api/admin/summary", {"headers": h}, 403),
        ("POST", "/api/admin/train", {"headers": h}, 403),
    ]
    for method, path, kwargs, status in cases:
        r = client.request(method, path, **kwargs)
        assert r.status_code == status, (method, path, str(kwargs.get("json") or kwargs.get("content"))[:60], r.text)
        assert r.headers["content-type"].startswith("application/json") and "detail" in r.json()


def test_tokens_are_stored_hashed(sessions, people):
    with sessions() as s:
        hashes = [a.token_hash for a in s.scalars(select(Annotator))]
    assert all(len(h) == 64 for h in hashes)
    assert not set(people.values()) & set(hashes)


def login(client, token):
    r = client.get(f"/login/{token}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=lax" in r.headers["set-cookie"].lower()
    return client.get("/").text


def test_page_escapes_text_and_cookie_posts_need_the_csrf_token(client, people, sessions):
    page = login(client, people["ana"])
    csrf = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page).group(1)
    assert "prefs collected" in page and "Guidelines" in page
    # walk to the pair that holds a <script>: it must appear escaped, never as markup
    for _ in range(6):
        pair_id = int(re.search(r'data-pair-id="(\d+)"', page).group(1))
        if pair_id == 2:
            break
        assert (
            client.post(
                "/api/votes", json={"pair_id": pair_id, "choice": "tie"}, headers={"X-CSRF-Token": csrf}
            ).status_code
            == 201
        )
        page = client.get("/").text
    assert pair_id == 2 and XSS not in page
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in page
    body = {"pair_id": 2, "choice": "left"}
    forged = client.post("/api/votes", json=body)  # cookie only, as a cross-site form would send it
    assert forged.status_code == 403 and "CSRF" in forged.json()["detail"]
    cross = client.post("/api/votes", json=body, headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"})
    assert cross.status_code == 403 and "cross-site" in cross.json()["detail"]
    wrong = client.post("/api/votes", json=body, headers={"X-CSRF-Token": "0" * 64})
    assert wrong.status_code == 403
    ok = client.post("/api/votes", json=body, headers={"X-CSRF-Token": csrf, "Origin": "http://testserver"})
    assert ok.status_code == 201
    with sessions() as s:
        assert s.scalar(select(Vote).where(Vote.pair_id == 2)).choice == "left"


def test_pages_need_sign_in_and_admin_page_an_admin(client, people):
    assert client.get("/", headers={"Accept": "text/html"}).status_code == 401
    assert client.get("/login/wrong", headers={"Accept": "text/html"}).status_code == 401
    login(client, people["ana"])
    assert client.get("/admin").status_code == 403
    login(client, people["root"])
    admin = client.get("/admin")
    assert admin.status_code == 200 and "Krippendorff" in admin.text and "/api/admin/export" in admin.text
    assert (
        "script-src 'self'" in admin.headers["content-security-policy"] and admin.headers["x-frame-options"] == "DENY"
    )


def test_authored_comparison_is_stored_with_what_it_teaches(client, people):
    body = {
        "prompt": "Capital of France?",
        "better": "Paris.",
        "worse": f"Lyon {XSS}",
        "teaches": "be correct",
        "bias": "prefers short answers",
    }
    r = client.post("/api/authored", headers=bearer(people["bob"]), json=body)
    assert r.status_code == 201 and r.json()["id"] == 1
    assert client.get("/api/stats", headers=bearer(people["bob"])).json()["authored"] == 1
    lines = client.get("/api/admin/export", headers=bearer(people["root"])).text.splitlines()
    row = json.loads(lines[-1])
    assert (row["chosen"], row["rejected"], row["authored"], row["teaches"], row["bias"], row["annotator"]) == (
        "Paris.",
        f"Lyon {XSS}",
        True,
        "be correct",
        "prefers short answers",
        "bob",
    )


def test_openapi_documents_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/next", "/api/votes", "/api/stats"} <= set(paths)
    assert set(paths["/api/votes"]) == {"get", "post"}
    assert "client_id" in str(client.get("/openapi.json").json()["components"]["schemas"]["VoteCreate"])


def test_guidelines_markdown_is_rendered_with_raw_html_escaped(project, sessions, people):
    from fastapi.testclient import TestClient

    from preflab.collect.app import create_app

    project.guidelines.write_text("# Rules\n\nPrefer **correct** answers. <script>window.__g = 1</script>\n")
    with TestClient(create_app(project, sessions)) as client:
        page = login(client, people["ana"])
    assert "<h1>Rules</h1>" in page and "<strong>correct</strong>" in page
    assert "<script>window.__g" not in page and "&lt;script&gt;window.__g = 1&lt;/script&gt;" in page


def test_a_database_that_refuses_connections_is_a_503_and_stores_nothing(client, people, sessions, monkeypatch):
    """PostgreSQL answers 'too many clients' when its max_connections is reached by others: a 503 to retry, not
    a 500."""
    from sqlalchemy.exc import OperationalError

    from preflab.collect import store

    def refuse(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception("FATAL: sorry, too many clients already"))

    monkeypatch.setattr(store, "annotator_by_token", refuse)
    r = client.get("/api/next", headers=bearer(people["ana"]))
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "nothing was stored" in r.json()["detail"]
