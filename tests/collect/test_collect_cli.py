"""`preflab collect` through the real entry point: init (pairs.jsonl, responses.jsonl, bad files), annotator,
export (exact rows, ties, both bad, authored) read back by `load_preferences` and the bias audit; and the
schema migration path (a version-1 database opens in this release with its data)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import inspect, select, text

from preflab.cli import main
from preflab.collect import store
from preflab.collect.db import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Assignment,
    Base,
    Pair,
    SchemaError,
    Vote,
    make_engine,
    migrate,
    open_database,
    schema_version,
)
from preflab.collect.project import load_project
from preflab.data import load_preferences

from .support import write_pairs


def init(tmp_path, *args, db_url=""):
    argv = ["collect", "init", str(tmp_path / "p"), *args] + (["--db", db_url] if db_url else [])
    return main(argv)


def test_init_from_pairs_and_annotator_json(tmp_path, capsys, db_url):
    assert (
        init(tmp_path, "--pairs", str(write_pairs(tmp_path / "pairs.jsonl", 4)), "--overlap", "3", db_url=db_url) == 0
    )
    project = load_project(tmp_path / "p")
    assert project.overlap == 3 and project.db == db_url and (tmp_path / "p" / "guidelines.md").is_file()
    printed = capsys.readouterr().out
    assert "4 pairs from" in printed and (not db_url or ":***@" in printed and db_url not in printed)  # no password
    assert main(["collect", "annotator", str(tmp_path / "p"), "ana", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"name", "token", "link"} and out["link"] == f"http://127.0.0.1:8000/login/{out['token']}"
    _, sessions = open_database(project.db_url)
    with sessions() as s:
        assert [p.source.rsplit("/", 1)[-1] for p in s.scalars(select(Pair))] == [
            f"pairs.jsonl:{i}" for i in range(1, 5)
        ]
        assert store.annotator_by_token(s, token=out["token"]).name == "ana"
    assert main(["collect", "annotator", str(tmp_path / "p"), "ana"]) == 2  # names are unique
    assert "already exists" in capsys.readouterr().err
    assert main(["collect", "annotator", str(tmp_path / "p"), "root", "--admin"]) == 0
    assert "root (admin): http://127.0.0.1:8000/login/" in capsys.readouterr().out


def test_init_from_responses_makes_every_pair(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text(
        json.dumps({"prompt": "2+2?", "responses": ["4", "5", "4", "four"]})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "hi"}], "responses": ["hello", "hey"]})
        + "\n"
    )
    assert init(tmp_path, "--pairs", str(path)) == 0
    _, sessions = open_database(load_project(tmp_path / "p").db_url)
    with sessions() as s:
        pairs = [(json.loads(p.prompt), {p.response_a, p.response_b}) for p in s.scalars(select(Pair))]
    assert pairs == [
        ("2+2?", {"4", "5"}),
        ("2+2?", {"4", "four"}),
        ("2+2?", {"5", "four"}),
        ([{"role": "user", "content": "hi"}], {"hello", "hey"}),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "response_a": "x"}', "response_b"),
        ('{"prompt": "p", "response_a": "x", "response_b": "x"}', "identical"),
        ('{"prompt": "p", "responses": ["x", "x"]}', "fewer than two distinct"),
        ('{"response_a": "x", "response_b": "y"}', "missing field 'prompt'"),
        ('{"prompt": "p", "response_a": "x"', "malformed JSON"),
    ],
)
def test_init_rejects_bad_rows_with_file_and_line(tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "response_a": "a", "response_b": "b"}\n' + line + "\n")
    assert init(tmp_path, "--pairs", str(path)) == 2
    err = capsys.readouterr().err
    assert f"{path}:2" in err and message in err
    assert not (tmp_path / "p").exists()  # nothing half-made


def test_init_needs_pairs_or_model(tmp_path, capsys):
    assert init(tmp_path) == 2
    assert "exactly one of --pairs" in capsys.readouterr().err
    assert init(tmp_path, "--pairs", "x.jsonl", "--overlap", "0") == 2
    assert "overlap must be >= 1, got 0" in capsys.readouterr().err


def vote_all(sessions, choices: dict[str, list[str]]) -> None:
    """Each named annotator votes the given choices on the pairs it is given, in order."""
    with sessions() as s:
        for name, seq in choices.items():
            person, _ = store.create_annotator(s, name=name)
            for choice in seq:
                assignment, pair = store.next_assignment(s, annotator_id=person.id, overlap=2)
                store.record_vote(
                    s, annotator_id=person.id, pair_id=pair.id, choice=choice, rationale=f"{name} {choice}"
                )


def test_export_rows_exactly_and_training_readers_accept_them(tmp_path, capsys, db_url):
    assert (
        init(tmp_path, "--pairs", str(write_pairs(tmp_path / "pairs.jsonl", 2)), "--overlap", "2", db_url=db_url) == 0
    )
    project = load_project(tmp_path / "p")
    _, sessions = open_database(project.db_url)
    vote_all(sessions, {"ana": ["left", "tie"], "bob": ["both_bad", "right"]})
    with sessions() as s:
        votes = {(v.annotator_id, v.pair_id): v for v in s.scalars(select(Vote))}
        pairs = {p.id: p for p in s.scalars(select(Pair))}
        store.add_authored(
            s,
            annotator_id=1,
            prompt="Capital of Peru?",
            chosen="Lima.",
            rejected="Cusco.",
            teaches="correctness",
            bias="short answers",
        )
    out = tmp_path / "votes.jsonl"
    assert main(["collect", "export", str(tmp_path / "p"), "--out", str(out)]) == 0
    assert "4 comparisons (1 ties, 1 authored)" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["annotator"], r["choice"] if "choice" in r else "authored") for r in rows] == [
        ("ana", "left"),
        ("ana", "tie"),
        ("bob", "right"),
        ("ana", "authored"),
    ]
    first = rows[0]
    vote, pair = votes[(1, first["pair_id"])], pairs[first["pair_id"]]
    left, right = (pair.response_a, pair.response_b) if vote.left_is_a else (pair.response_b, pair.response_a)
    assert first == {
        "prompt": json.loads(pair.prompt),
        "chosen": left,
        "rejected": right,
        "tie": False,
        "annotator": "ana",
        "chosen_position": "A",
        "choice": "left",
        "left": "a" if vote.left_is_a else "b",
        "rule": "random",
        "rationale": "ana left",
        "pair_id": pair.id,
        "vote_id": vote.id,
        "shown_at": vote.shown_at,
        "voted_at": vote.created_at,
        "chosen_length": len(left.split()),
        "rejected_length": len(right.split()),
        "length_unit": "words",
        "source": pair.source,
    }
    right_vote = rows[2]
    pair = pairs[right_vote["pair_id"]]
    v = votes[(2, pair.id)]
    shown_right = pair.response_b if v.left_is_a else pair.response_a
    assert (right_vote["chosen"], right_vote["chosen_position"], right_vote["tie"]) == (shown_right, "B", False)
    assert rows[1]["tie"] is True and rows[1]["chosen_position"] == "A"
    assert rows[3] == {
        "prompt": "Capital of Peru?",
        "chosen": "Lima.",
        "rejected": "Cusco.",
        "tie": False,
        "annotator": "ana",
        "authored": True,
        "teaches": "correctness",
        "bias": "short answers",
        "authored_id": 1,
        "voted_at": rows[3]["voted_at"],
        "chosen_length": 1,
        "rejected_length": 1,
        "length_unit": "words",
    }
    data = load_preferences(out)  # what preflab reward and preflab dpo read
    assert [(p.annotator, p.tie) for p in data.rows] == [("ana", False), ("ana", True), ("bob", False), ("ana", False)]
    with_bad = tmp_path / "all.jsonl"
    assert (
        main(
            [
                "collect",
                "export",
                str(tmp_path / "p"),
                "--out",
                str(with_bad),
                "--include-both-bad",
                "--authored",
                "false",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in with_bad.read_text().splitlines()]
    assert [(r["choice"], r["tie"], r.get("both_bad", False)) for r in rows] == [
        ("left", False, False),
        ("tie", True, False),
        ("both_bad", True, True),
        ("right", False, False),
    ]


def test_the_schema_matches_the_models_and_old_databases_migrate(tmp_path, db_url):
    url = db_url or f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    assert migrate(engine, target=1) == 1  # a database made by the first release
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO pairs (prompt, response_a, response_b, source, assigned, created_at) "
                "VALUES ('\"p\"', 'a', 'b', 'f:1', 1, 1.0)"
            )
        )
        conn.execute(
            text("INSERT INTO annotators (name, token_hash, is_admin, created_at) VALUES ('old', 'h', 0, 1.0)")
        )
        conn.execute(
            text("INSERT INTO assignments (annotator_id, pair_id, left_is_a, created_at) VALUES (1, 1, 1, 1.0)")
        )
        conn.execute(
            text(
                "INSERT INTO votes (annotator_id, pair_id, choice, left_is_a, rationale, client_id, shown_at, "
                "created_at) VALUES (1, 1, 'left', 1, '', NULL, 1.0, 2.0)"
            )
        )
    assert schema_version(engine) == 1
    engine.dispose()
    engine, sessions = open_database(url)  # what `preflab collect serve` does on start
    assert schema_version(engine) == SCHEMA_VERSION == len(MIGRATIONS)
    with sessions() as s:
        vote = s.scalar(select(Vote))
        assert (vote.choice, vote.rule, s.get(Pair, 1).score, s.scalar(select(Assignment)).rule) == (
            "left",
            "random",
            None,
            "random",
        )
    columns = {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in Base.metadata.tables}
    assert columns == {name: set(table.columns.keys()) for name, table in Base.metadata.tables.items()}
    with engine.begin() as conn:
        conn.execute(text("UPDATE meta SET value = '99' WHERE key = 'schema_version'"))
    with pytest.raises(SchemaError, match="newer than this preflab"):
        migrate(engine)
    engine.dispose()


def test_init_with_a_model_generates_the_pairs(tmp_path, model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?"}) + "\n" for i in range(3)))
    assert (
        main(["collect", "init", str(tmp_path / "p"), "--model", str(model_dir), "--prompts", str(prompts), "-k", "3"])
        == 0
    )
    responses = [
        json.loads(line) for line in (tmp_path / "p" / "generate" / "responses.jsonl").read_text().splitlines()
    ]
    assert [len(r["responses"]) for r in responses] == [3, 3, 3]
    _, sessions = open_database(load_project(tmp_path / "p").db_url)
    with sessions() as s:
        pairs = s.scalars(select(Pair)).all()
    expected = sum(len(set(r["responses"])) * (len(set(r["responses"])) - 1) // 2 for r in responses)
    assert len(pairs) == expected and all(
        p.source.startswith(str(tmp_path / "p" / "generate" / "pairs.jsonl")) for p in pairs
    )
