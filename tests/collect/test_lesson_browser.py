"""The lesson's demo in headless Chromium (Debian's `chromium`, driven by Playwright) against a real server:
open the demo's link, vote 30 times by key (by the true utility, as a careful person would), watch the reward
model retrain by itself and agree with held-out votes, see the biases panel, train the policy on the votes and
read the before / after panel; then add a thousand length-biased simulated votes and train again.

The SFT policy is the micro Llama of tests/conftest.py, or $PREFLAB_LESSON_MODEL (the docs' screenshots use
the one `preflab collect demo` builds). Screenshots go to $PREFLAB_SCREENSHOTS when set (the docs' images:
PREFLAB_SCREENSHOTS=docs/img), else to the test's temporary folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from preflab.collect.db import Pair, open_database
from preflab.collect.lesson import load_lesson
from preflab.collect.lesson.setup import LessonConfig, create_lesson
from preflab.world import true_utility

try:
    from playwright.sync_api import expect
except ImportError:  # the fixture skips (or fails under CI) before anything uses it
    expect = None

JOB = 240_000  # ms: a background job on a busy 2-core machine


def test_vote_train_and_compare_in_chromium(tmp_path, browser, server_factory, model_dir):
    shots = Path(os.environ.get("PREFLAB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    real = os.environ.get("PREFLAB_LESSON_MODEL", "")
    root = tmp_path / "lesson"
    create_lesson(
        LessonConfig(
            model=real or str(model_dir), n_prompts=200 if real else 40, max_new_tokens=32 if real else 12, serve=False
        ),
        root,
    )
    lesson = load_lesson(root)
    if not real:  # the micro model: a short budget is enough to check the plumbing
        lesson.dpo, lesson.eval_prompts, lesson.max_new_tokens = {"max_steps": 4, "batch_size": 8}, 8, 12
        lesson.ppo = {"max_steps": 2, "batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 8}
        lesson.save(root)
    engine, sessions = open_database(f"sqlite:///{root / 'collect.db'}")
    server = server_factory(root).start()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # 1. the demo's link opens the lesson page
    page.goto(server.url + "/lesson/login/" + lesson.link.rsplit("/", 1)[1])
    assert page.url.endswith("/lesson")
    expect(page.locator("#collected")).to_have_text("0")
    page.screenshot(path=str(shots / "lesson-1-vote.png"))

    # 2. thirty votes by key, each for the answer of higher true utility (ties to the left)
    for i in range(30):
        pair_id = int(page.locator("#pair").get_attribute("data-pair-id"))
        with sessions() as s:
            prompt = json.loads(s.get(Pair, pair_id).prompt)
        left, right = (page.evaluate(f"document.getElementById('{side}').textContent") for side in ("left", "right"))
        page.keyboard.press("1" if true_utility(prompt, left).total >= true_utility(prompt, right).total else "2")
        # the next pair has loaded: the page's 2-second poll can show the new count while the vote's own
        # request is still in flight, and a key pressed then is ignored (the page is busy with this vote)
        expect(page.locator("#pair")).not_to_have_attribute("data-pair-id", str(pair_id), timeout=15_000)
        expect(page.locator("#mine")).to_have_text(str(i + 1), timeout=15_000)
    expect(page.locator("#collected")).to_have_text("30")

    # 3. the reward model retrained by itself (every 10 votes); once idle, retrain on all 30 by the button
    expect(page.locator("#reward-status")).not_to_have_text(re.compile("not trained"), timeout=15_000)
    expect(page.locator("#reward-status")).not_to_have_attribute("data-status", "running", timeout=JOB)
    page.click("#reward-train")
    expect(page.locator("#reward-status")).to_have_text(re.compile(r"running"), timeout=15_000)
    expect(page.locator("#reward-status")).to_have_attribute("data-status", "done", timeout=JOB)
    expect(page.locator("#reward-status")).to_have_text(re.compile(r"done on 30 votes"))
    expect(page.locator("#reward-agreement")).to_have_text(re.compile(r"^\d+% \[\d+%, \d+%\] of \d+ \(a coin: 50%\)$"))
    # the biases panel: a coefficient with its interval per bias, the person agreeing with the truth
    interval = re.compile(r"^[+-]\d\.\d{3} \[[+-]\d+\.\d{3}, [+-]\d+\.\d{3}\]")
    expect(page.locator("#bias-length td").nth(1)).to_have_text(interval)
    assert page.locator("#bias-utility td").nth(2).inner_text().startswith("you picked the truly better answer 100%")
    page.screenshot(path=str(shots / "lesson-2-reward-and-biases.png"), full_page=True)

    # 4. train the policy on my votes: progress, then the before / after panel with numbers
    page.click("#policy-train")
    expect(page.locator("#policy-status")).to_have_attribute("data-status", "running", timeout=15_000)
    expect(page.locator("#policy-status")).to_have_text(
        re.compile(r"training, step [1-9]\d* of|evaluating|: done"), timeout=JOB
    )
    page.screenshot(path=str(shots / "lesson-3-training.png"))  # (the micro model may be done already)
    expect(page.locator("#policy-status")).to_have_attribute("data-status", "done", timeout=JOB)
    summary = page.locator("#policy-summary").inner_text()
    assert re.search(
        r"On \d+ held-out prompts: true utility -?\d\.\d\d → -?\d\.\d\d, change [+-]\d\.\d\d "
        r"\[[+-]\d\.\d\d, [+-]\d\.\d\d\]; KL to the SFT policy -?\d+\.\d\d \[",
        summary,
    ), summary
    assert page.locator("#side-by-side tr").count() == 1 + min(6, lesson.eval_prompts)
    page.locator("#policy-panel").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "lesson-4-before-after.png"), full_page=True)

    # 5. a thousand votes from simulated annotators with a planted length bias, and the policy trained on all
    page.fill("#simulate-form input[name=votes]", "1000" if real else "200")
    page.fill("#simulate-form input[name=length_bias]", "0.3")
    page.click("#simulate-form button[type=submit]")
    expect(page.locator("#simulate-status")).to_have_text(
        re.compile(r"^added \d+ votes from 8 simulated annotators"), timeout=60_000
    )
    page.select_option("#policy-data", "all")
    page.click("#policy-train")
    expect(page.locator("#policy-status")).to_have_text(re.compile(r"^job 2 "), timeout=15_000)
    expect(page.locator("#policy-status")).to_have_attribute("data-status", "done", timeout=JOB)
    runs = page.locator("#policy-runs tr")
    expect(runs).to_have_count(3)
    assert runs.nth(2).locator("td").nth(2).inner_text() == "all votes"
    assert re.match(r"^\d+\.\d → \d+\.\d$", runs.nth(2).locator("td").nth(5).inner_text())
    page.screenshot(path=str(shots / "lesson-5-simulated-length-bias.png"), full_page=True)

    # 6. PPO against the reward model (retrained by itself on everyone's votes after the simulated ones arrived)
    expect(page.locator("#reward-status")).to_have_attribute("data-status", "done", timeout=JOB)
    page.select_option("#policy-algorithm", "ppo")
    page.click("#policy-train")
    expect(page.locator("#policy-status")).to_have_text(re.compile(r"^job 3 \(ppo"), timeout=15_000)
    expect(page.locator("#policy-status")).to_have_attribute("data-status", "done", timeout=JOB)
    expect(runs).to_have_count(4)
    assert runs.nth(3).locator("td").nth(1).inner_text() == "ppo"
    assert errors == []
    engine.dispose()
