"""The pages in headless Chromium (Debian's `chromium`, driven by Playwright) against a real server: open an
annotator link, see a `<script>` response as text, press 1, watch the counter go up and find the vote in the
database; author a comparison; open the admin page. Screenshots go to $PREFLAB_SCREENSHOTS when set (the docs'
images are made with PREFLAB_SCREENSHOTS=docs/img), else to the test's temporary folder."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from sqlalchemy import select

from .support import XSS, new_project

try:
    from playwright.sync_api import expect
except ImportError:  # the fixture skips (or fails under CI) before anything uses it
    expect = None
from preflab.collect import store
from preflab.collect.db import Assignment, Authored, Vote, now, open_database


def simulated_votes(sessions, n_pairs: int) -> None:
    """Three people who know which response is better (response_a on odd pair ids) with accuracy 0.9, 0.8
    and 0.7; the third also picks the left side a quarter of the time. Numbers for the admin page."""
    rng = random.Random(0)
    with sessions() as s:
        for name, accuracy, p_left in (("sim-a", 0.9, 0.0), ("sim-b", 0.8, 0.0), ("sim-c", 0.7, 0.25)):
            person, _ = store.create_annotator(s, name=name)
            for _ in range(n_pairs - 2):
                assignment, pair = store.next_assignment(s, annotator_id=person.id, overlap=4, rng=rng)
                better_is_left = (pair.id % 2 == 1) == bool(assignment.left_is_a)
                right_answer = "left" if better_is_left else "right"
                wrong_answer = "right" if better_is_left else "left"
                choice = (
                    "left" if rng.random() < p_left else (right_answer if rng.random() < accuracy else wrong_answer)
                )
                choice = "tie" if rng.random() < 0.05 else choice
                store.record_vote(s, annotator_id=person.id, pair_id=pair.id, choice=choice)


@pytest.mark.slow
def test_vote_author_and_admin_in_chromium(tmp_path, browser, server_factory):
    shots = Path(os.environ.get("PREFLAB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    project = new_project(tmp_path / "proj", "", n_pairs=24, overlap=4)
    engine, sessions = open_database(project.db_url)
    simulated_votes(sessions, 24)
    with sessions() as s:
        ana, ana_token = store.create_annotator(s, name="ana")
        _, root_token = store.create_annotator(s, name="root", is_admin=True)
        # ana's first pair is the one holding a <script>
        s.add(Assignment(annotator_id=ana.id, pair_id=2, left_is_a=0, rule="random", created_at=now()))
        s.commit()
    server = server_factory(project.dir).start()
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # 1. the personal link signs in and shows the pair; the <script> is text
    page.goto(f"{server.url}/login/{ana_token}")
    assert page.locator("#right").inner_text() == "2."
    assert XSS in page.locator("#left").inner_text()
    assert page.evaluate("window.__xss") is None
    before = int(page.locator("#collected").inner_text())
    assert before == 3 * 22
    page.locator("#rationale").fill("the short answer is right")
    page.locator("#rationale").blur()
    page.screenshot(path=str(shots / "collect-vote.png"))
    page.keyboard.press("1")
    expect(page.locator("#collected")).to_have_text(str(before + 1), timeout=15000)
    assert page.locator("#mine").inner_text() == "1"
    assert page.locator("#pair").get_attribute("data-pair-id") != "2"  # the next pair is shown
    with sessions() as s:
        vote = s.scalar(select(Vote).where(Vote.annotator_id == ana.id))
        assert (vote.pair_id, vote.choice, vote.left_is_a, vote.rationale) == (
            2,
            "left",
            0,
            "the short answer is right",
        )

    # 2. author mode
    page.goto(f"{server.url}/author")
    page.fill("textarea[name=prompt]", "What is the capital of Peru?")
    page.fill("textarea[name=better]", "Lima.")
    page.fill("textarea[name=worse]", "I believe it is probably Cusco, a beautiful city with a long history.")
    page.fill("input[name=teaches]", "a short correct answer beats a long wrong one")
    page.fill("input[name=bias]", "may teach that short answers are always better")
    page.screenshot(path=str(shots / "collect-author.png"))
    page.click("button[type=submit]")
    expect(page.locator("#author-status")).to_have_text("saved", timeout=15000)
    with sessions() as s:
        row = s.scalar(select(Authored))
        assert (row.annotator_id, row.chosen, row.teaches) == (
            ana.id,
            "Lima.",
            "a short correct answer beats a long wrong one",
        )
    assert page.locator("#authored").inner_text() == "1"

    # 3. the admin page needs the admin's link
    page.goto(f"{server.url}/admin")
    assert "admin token" in page.content()
    admin = browser.new_page(viewport={"width": 1100, "height": 1000})
    admin.goto(f"{server.url}/login/{root_token}")
    admin.goto(f"{server.url}/admin")
    assert admin.locator("#progress").inner_text().startswith(f"{3 * 22 + 1} of 96 votes")
    assert admin.locator("#kappa tr").count() == 1 + 3  # header + three pairs of annotators
    float(admin.locator("#alpha").inner_text())  # a number, not n/a
    admin.screenshot(path=str(shots / "collect-admin.png"), full_page=True)
    assert errors == []
    engine.dispose()
