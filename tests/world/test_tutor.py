import random

import pytest

from preflab.world.tutor import (
    CAPITALS,
    COMPONENTS,
    DEMO_STYLE,
    Style,
    all_tasks,
    corpus,
    demonstrations,
    prompts,
    question_of,
    respond,
    split_tasks,
    task_for,
    true_utility,
)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The capital of France is Paris.", (1.0, 1.0, 0.0, 0.0, 0.0)),
        ("Sure! The capital of France is Paris.", (1.5, 1.0, 0.0, 0.5, 0.0)),
        ("Ugh, obviously. The capital of France is Rome.", (-1.5, -1.0, 0.0, -0.5, 0.0)),
        ("The capital of France is Paris. I hope this helps. Learning is fun.", (0.5, 1.0, 0.0, 0.0, -0.5)),
        ("I am not sure.", (0.0, 0.0, 0.0, 0.0, 0.0)),
        ("Paris", (-1.0, -1.0, 0.0, 0.0, 0.0)),
        ("", (-1.0, -1.0, 0.0, 0.0, 0.0)),
    ],
)
def test_true_utility_by_hand(response, expected):
    u = true_utility(FRANCE, response)
    assert (u.total, u.correctness, u.honesty, u.tone, u.concision) == expected
    assert u.total == sum(getattr(u, c) for c in COMPONENTS)


def test_honesty_on_unanswerable_questions():
    q = "Name the capital of Narnia."
    admit = true_utility(q, "I am not sure. I do not know the capital of Narnia.")
    invent = true_utility(q, "The capital of Narnia is Paris.")
    assert (admit.correctness, admit.honesty, admit.concision) == (0.0, 1.0, 0.0)
    assert (invent.correctness, invent.honesty) == (0.0, -1.0)
    assert admit.total > invent.total


def test_addition_in_every_phrasing():
    for q in ["What is 3 + 4?", "How much is 3 + 4?", "Compute 3 + 4.", "Tell me 3 + 4."]:
        assert true_utility(q, "3 + 4 = 7.").correctness == 1.0
        assert true_utility(q, "3 + 4 = 8.").correctness == -1.0
        assert true_utility(q, "4 + 3 = 7.").correctness == -1.0  # answers a different question


def test_task_for_parses_every_question_and_rejects_others():
    tasks = all_tasks(phrasings=True)
    assert len(tasks) == 4 * len(all_tasks())
    assert all(task_for(t.question) == t for t in tasks)
    with pytest.raises(ValueError):
        task_for("How are you?")
    assert question_of([{"role": "system", "content": "x"}, {"role": "user", "content": "Hi?"}]) == "Hi?"


def test_held_out_prompts_are_new_questions_about_shared_facts():
    train, held = split_tasks()
    assert not {t.question for t in train} & {t.question for t in held}
    held_places = {t.subject for t in held if t.kind == "capital"}
    assert held_places & {t.subject for t in train if t.kind == "capital"}  # facts shared
    train_q = {p[0]["content"] for p in prompts(500, seed=1, split="train")}
    eval_q = {p[0]["content"] for p in prompts(500, seed=1, split="eval")}
    assert not train_q & eval_q
    assert {task_for(q).kind for q in eval_q} == {"capital", "add", "unknown"}


def test_everything_is_seeded():
    assert prompts(20, seed=3) == prompts(20, seed=3) != prompts(20, seed=4)
    assert corpus(50, seed=0) == corpus(50, seed=0) != corpus(50, seed=1)
    assert demonstrations(30, seed=0) == demonstrations(30, seed=0)


def test_writers_follow_their_style():
    rng = random.Random(0)
    tasks = [t for t in all_tasks(phrasings=True) if t.kind == "capital"]
    perfect = Style(p_right=1.0, p_hedge=0.0, p_polite=1.0, p_rude=0.0, mean_padding=0.0)
    for t in tasks[:20]:
        u = true_utility(t.question, respond(t, rng, perfect))
        assert (u.correctness, u.tone, u.concision) == (1.0, 0.5, 0.0)
    demos = demonstrations(600, seed=0)
    right = sum(
        true_utility(d["prompt"], d["completion"]).correctness == 1.0
        for d in demos
        if task_for(d["prompt"][0]["content"]).kind != "unknown"
    )
    n_known = sum(task_for(d["prompt"][0]["content"]).kind != "unknown" for d in demos)
    assert right / n_known == pytest.approx(DEMO_STYLE.p_right, abs=0.06)


def test_corpus_mixes_facts_and_transcripts_with_mostly_right_answers():
    docs = corpus(1000, seed=0)
    transcripts = [d for d in docs if d.startswith("<|bos|><|user|>")]
    assert 0.6 < len(transcripts) / len(docs) < 0.8
    facts = " ".join(d for d in docs if not d.startswith("<|bos|>"))
    assert f"The capital of France is {CAPITALS['France']}." in facts
