"""Simulated annotators: noisy, optionally biased people voting on pairs of responses.

Each annotator prefers the response shown first (A) over the second (B) with probability

    P(A preferred) = sigmoid((u_A - u_B) / temperature + length_bias * (len_A - len_B) + position_bias)

where u is the world's true utility (`preflab.world.true_utility`), `temperature` is the annotator's own
noise (larger: noisier), `len` is the response length in WORDS (`preflab.data.n_words`: whitespace-separated,
so the bias does not depend on any tokenizer) and `position_bias > 0` favours the left/first response. A pool of
annotators is drawn from one seed; each vote is drawn from another.

The votes are written as the same comparison JSONL that people's votes are (`preflab.data.load_preferences`
reads both), one row per vote:

    {"prompt": [...], "chosen": "...", "rejected": "...", "annotator": "sim-03", "tie": false,
     "chosen_position": "A", "chosen_length": 9, "rejected_length": 4, "length_unit": "words"}

`chosen_position` says where the chosen response was shown, which the bias audit
(`preflab eval bias FILE`) needs. A tie (an annotator with `tie_rate > 0` facing two responses of equal
true utility) keeps the shown order, with `"tie": true`.

Raters who cannot judge (limited knowledge). By default every annotator knows every fact of the world, and the
formula above is all there is. With `annotator_pool(knowledge=k)` each annotator knows a fixed, seeded subset of
`round(k * 77)` facts (`tutor.all_facts`: one per capital, sum and made-up place; every phrasing of a question
shares its fact). On a question whose fact the annotator does not know, correctness and honesty are invisible
to them, and they judge by surface cues instead: in the formula, u becomes

    u_seen = u - correctness - honesty + surface,   surface = confidence_credit for a confident answer
                                                              (right or wrong), 0 for "I am not sure.",
                                                              -1 for no recognisable answer (`tutor.answer_form`)

(tone and concision stay visible) and the length term gains `guess_length_bias` per word (a longer answer looks
more thorough to someone who cannot check it). So a confident wrong answer beats an honest hedge, and a right
answer and a wrong one of the same form and length are a coin flip. `knowledge_overlap` in [0, 1] sets how much
the annotators' subsets coincide (0: independent draws; 1: all know the same facts, the crowd's common
knowledge).

An oversight aid (`Aid(recall, precision)`, a critique step) helps those annotators: on a pair with a wrong
response (correctness or honesty below 0), with probability `recall` a critique points the error out and the
annotator judges the pair as if they knew the fact (the full-knowledge formula, same draws: with recall 1 they
vote exactly as a full-knowledge annotator would on every pair with a wrong answer). With `precision < 1` the
aid also raises false alarms: on a pair without a wrong response, with probability `f` it flags one confident
right answer as wrong and the annotator believes it (its surface becomes -1), where `f` is set so that, over the
pairs voted on, flagged errors / all flags = precision in expectation. Annotators who know the fact see through
the critique either way. The aid's draws come from their own seeded stream, so the vote draws line up with a
run without it. Rows of limited-knowledge annotators also carry `"knew"` (whether they knew the fact) and
`"aid"` ("critique", "false_alarm" or null).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from preflab.data.text import n_words
from preflab.world.tutor import (
    CORPUS_STYLE,
    DEMO_STYLE,
    Style,
    all_facts,
    answer_form,
    fact_of,
    prompts,
    question_of,
    respond,
    task_for,
    true_utility,
)

# Writers for candidate pairs straight from the world: a careful one and a sloppy, wordy one.
SLOPPY_STYLE = Style(p_right=0.5, p_hedge=0.15, p_polite=0.3, p_rude=0.3, mean_padding=1.5)
WORLD_STYLES = (DEMO_STYLE, CORPUS_STYLE, SLOPPY_STYLE)


@dataclass(frozen=True)
class Annotator:
    name: str
    temperature: float = 0.5  # noise: the utility difference is divided by it
    length_bias: float = 0.0  # logit per word of length difference (A minus B)
    position_bias: float = 0.0  # logit added in favour of the first-shown response
    tie_rate: float = 0.0  # probability of calling a tie when the true utilities are equal
    knows: frozenset[str] | None = None  # the facts this annotator can check (`tutor.fact_of`); None: every fact
    confidence_credit: float = 0.5  # on an unknown fact: the utility credited to a confident answer (hedge: 0)
    guess_length_bias: float = 0.05  # on an unknown fact: extra logit per word of length difference

    def p_first(self, u_a: float, u_b: float, len_a: int, len_b: int, guessing: bool = False) -> float:
        """P(A preferred): the module docstring's formula (`guessing`: with the extra length term of an
        annotator who cannot check the fact)."""
        z = (u_a - u_b) / self.temperature + self.length_bias * (len_a - len_b) + self.position_bias
        if guessing:
            z += self.guess_length_bias * (len_a - len_b)
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))  # no overflow

    def knows_fact(self, prompt) -> bool:
        """Whether this annotator can check the answer to the prompt's question."""
        return self.knows is None or fact_of(task_for(question_of(prompt))) in self.knows


@dataclass(frozen=True)
class Aid:
    """An oversight aid: a critique that points out a wrong response (see the module docstring)."""

    recall: float = 1.0  # share of the pairs with a wrong response whose error the critique points out
    precision: float = 1.0  # share of the aid's flags that are real errors (below 1: false alarms on right answers)

    def __post_init__(self):
        if not 0 <= self.recall <= 1:
            raise ValueError(f"aid recall must be in [0, 1], got {self.recall}")
        if not 0 < self.precision <= 1:
            raise ValueError(f"aid precision must be in (0, 1], got {self.precision}")


def is_wrong(prompt, response: str) -> bool:
    """A response the aid may point out: a wrong (or missing) answer, or a confident invention."""
    u = true_utility(prompt, response)
    return u.correctness < 0 or u.honesty < 0


def surface_utility(prompt, response: str, total: float, confidence_credit: float, flagged: bool = False) -> float:
    """u_seen of the module docstring: the utility `total` with correctness and honesty replaced by the surface
    cue a rater who cannot check the fact sees (a `flagged` response was called wrong by the aid: -1)."""
    u = true_utility(prompt, response)
    form = answer_form(prompt, response)
    surface = -1.0 if flagged else {"answer": confidence_credit, "hedge": 0.0}.get(form, -1.0)
    return total - u.correctness - u.honesty + surface


def known_facts(n: int, knowledge: float, overlap: float, seed: int) -> list[frozenset[str] | None]:
    """Per annotator, the facts they know: the `round(knowledge * len(all_facts()))` facts of lowest score
    overlap * c_f + (1 - overlap) * e_if (c_f a draw per fact shared by the pool, e_if one per annotator and
    fact, all uniform and seeded by `seed`). knowledge 1: None (every fact) for everyone."""
    if not 0 <= knowledge <= 1:
        raise ValueError(f"knowledge must be in [0, 1], got {knowledge}")
    if not 0 <= overlap <= 1:
        raise ValueError(f"knowledge_overlap must be in [0, 1], got {overlap}")
    if knowledge == 1:
        return [None] * n
    facts = all_facts()
    rng = random.Random(f"knowledge:{seed}")  # its own stream: the pool's other draws do not move
    common = [rng.random() for _ in facts]
    out = []
    for _ in range(n):
        score = [overlap * c + (1 - overlap) * rng.random() for c in common]
        order = sorted(range(len(facts)), key=lambda k: (score[k], k))
        out.append(frozenset(facts[k] for k in order[: round(knowledge * len(facts))]))
    return out


def annotator_pool(
    n: int = 8,
    seed: int = 0,
    temperature: tuple[float, float] = (0.3, 1.0),
    length_bias: float = 0.0,
    position_bias: float = 0.0,
    bias_spread: float = 0.0,
    tie_rate: float = 0.0,
    knowledge: float = 1.0,
    knowledge_overlap: float = 0.0,
    confidence_credit: float = 0.5,
    guess_length_bias: float = 0.05,
) -> list[Annotator]:
    """n annotators, each with its own temperature drawn uniformly from `temperature`.

    Planted biases are shared by the pool; `bias_spread` (a share, e.g. 0.5) lets each annotator's biases
    vary by up to that share around the planted values. `knowledge` < 1 gives each annotator a seeded subset of
    the world's facts (`known_facts`); on the others they judge by surface cues (the module docstring).
    """
    if n < 1:
        raise ValueError(f"a pool needs at least one annotator, got n={n}")
    lo, hi = temperature
    if not 0 < lo <= hi:
        raise ValueError(f"temperature range must satisfy 0 < low <= high, got {temperature}")
    knows = known_facts(n, knowledge, knowledge_overlap, seed)
    rng = random.Random(seed)
    pool = []
    for i in range(n):
        spread = lambda: 1.0 + bias_spread * rng.uniform(-1, 1)  # noqa: E731
        pool.append(
            Annotator(
                f"sim-{i:02d}",
                rng.uniform(lo, hi),
                length_bias * spread(),
                position_bias * spread(),
                tie_rate,
                knows[i],
                confidence_credit,
                guess_length_bias,
            )
        )
    return pool


def world_pairs(
    n: int, seed: int = 0, split: str = "train", styles: tuple[Style, ...] = WORLD_STYLES, max_tries: int = 20
) -> list[tuple]:
    """n candidate pairs (prompt, response_a, response_b) straight from the world, two different writers each.

    Each pair draws two distinct styles from `styles` and two responses from `tutor.respond`; the order in the
    pair is random, so no style sits in one position. Identical responses are redrawn (a vote on two equal
    texts carries no preference).
    """
    rng = random.Random(seed)
    out = []
    for prompt in prompts(n, seed=seed, split=split):
        task = task_for(question_of(prompt))
        style_a, style_b = rng.sample(list(styles), 2)
        a = respond(task, rng, style_a)
        for _ in range(max_tries):
            b = respond(task, rng, style_b)
            if b != a:
                break
        else:
            continue
        out.append((prompt, a, b))
    return out


def simulate_votes(
    pairs: list[tuple],
    annotators: list[Annotator],
    seed: int = 0,
    votes_per_pair: int = 1,
    swap: bool = True,
    utility=None,
    aid: Aid | None = None,
) -> list[dict]:
    """Votes on candidate pairs as comparison rows (see the module docstring).

    pairs: (prompt, response_a, response_b) with prompts from the world (chat messages or the question).
    Each pair is shown to `votes_per_pair` distinct annotators drawn from the pool (with replacement when the
    pool is smaller); with `swap` each showing puts the two responses in a random order, as a collection app
    would. `utility(prompt, response) -> float` defaults to the world's true utility. `aid`: the oversight aid
    shown to annotators who do not know a question's fact (None: no aid).
    """
    if votes_per_pair < 1:
        raise ValueError(f"votes_per_pair must be >= 1, got {votes_per_pair}")
    utility = utility or (lambda p, r: true_utility(p, r).total)
    rng = random.Random(seed)
    limited = any(a.knows is not None for a in annotators)
    aid_rng = random.Random(f"aid:{seed}")  # the aid's own stream: the vote draws stay those of a run without it
    false_alarm = false_alarm_rate(pairs, aid) if limited and aid else 0.0
    rows = []
    for prompt, x, y in pairs:
        u = {x: utility(prompt, x), y: utility(prompt, y)}
        if votes_per_pair <= len(annotators):
            voters = rng.sample(annotators, votes_per_pair)
        else:
            voters = [rng.choice(annotators) for _ in range(votes_per_pair)]
        for who in voters:
            a, b = (y, x) if swap and rng.random() < 0.5 else (x, y)
            seen, guessing, helped = u, False, None
            if not who.knows_fact(prompt):
                seen, guessing, helped = guess(prompt, (a, b), u, who, aid, false_alarm, aid_rng)
            if who.tie_rate and seen[a] == seen[b] and rng.random() < who.tie_rate:
                chosen, rejected, position, tie = a, b, "A", True
            elif rng.random() < who.p_first(seen[a], seen[b], n_words(a), n_words(b), guessing):
                chosen, rejected, position, tie = a, b, "A", False
            else:
                chosen, rejected, position, tie = b, a, "B", False
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "annotator": who.name,
                    "tie": tie,
                    "chosen_position": position,
                    "chosen_length": n_words(chosen),
                    "rejected_length": n_words(rejected),
                    "length_unit": "words",
                }
            )
            if limited:
                rows[-1].update(knew=who.knows_fact(prompt), aid=helped)
    return rows


def guess(prompt, shown: tuple[str, str], u: dict, who: Annotator, aid: Aid | None, false_alarm: float, rng):
    """What an annotator who does not know the prompt's fact sees of the two shown responses: (utilities as
    seen, guessing?, what the aid did). With a critique they judge as if they knew (`u`, not guessing)."""
    wrong = [r for r in shown if is_wrong(prompt, r)]
    if aid and wrong and rng.random() < aid.recall:
        return u, False, "critique"
    flagged = None
    if aid and not wrong and false_alarm > 0:
        right = [r for r in shown if answer_form(prompt, r) == "answer"]
        if right and rng.random() < false_alarm:
            flagged = rng.choice(right)
    seen = {r: surface_utility(prompt, r, u[r], who.confidence_credit, flagged=r == flagged) for r in shown}
    return seen, True, "false_alarm" if flagged is not None else None


def false_alarm_rate(pairs: list[tuple], aid: Aid) -> float:
    """The probability f of a false alarm on a pair without a wrong response that holds a confident right
    answer, such that expected flags on wrong pairs / all expected flags = precision:
    f = recall * W * (1 - precision) / (precision * R), W and R those pairs' counts (f capped at 1)."""
    if aid.precision >= 1:
        return 0.0
    n_wrong = n_right = 0
    for prompt, x, y in pairs:
        if is_wrong(prompt, x) or is_wrong(prompt, y):
            n_wrong += 1
        elif "answer" in (answer_form(prompt, x), answer_form(prompt, y)):
            n_right += 1
    if n_right == 0:
        return 0.0
    return min(1.0, aid.recall * n_wrong * (1 - aid.precision) / (aid.precision * n_right))


def ceiling_accuracy(pairs: list[tuple], annotators: list[Annotator], utility=None) -> float:
    """Expected agreement of the best possible reward model with these annotators' (non-tie) votes.

    A reward model scores each response alone, so it cannot see where a response was shown: the best it can do
    on a pair is to order it the way most votes go, averaging each annotator's P(x preferred) over the two
    display orders and over the pool. Its expected accuracy is the mean over pairs of max(q, 1 - q). Position
    bias and annotator noise both lower this ceiling; ties are left out, as RM accuracy leaves them out.
    """
    utility = utility or (lambda p, r: true_utility(p, r).total)
    total = 0.0
    for prompt, x, y in pairs:
        ux, uy, lx, ly = utility(prompt, x), utility(prompt, y), n_words(x), n_words(y)
        q = sum(0.5 * (a.p_first(ux, uy, lx, ly) + 1.0 - a.p_first(uy, ux, ly, lx)) for a in annotators) / len(
            annotators
        )
        total += max(q, 1.0 - q)
    return total / max(len(pairs), 1)


def write_votes(path: str | Path, rows: list[dict]) -> Path:
    from preflab.data import write_jsonl

    return write_jsonl(path, rows)


def describe_pool(annotators: list[Annotator]) -> list[dict]:
    """The pool as JSON-ready dicts; the knowledge fields appear only for annotators who lack some facts."""
    out = []
    for a in annotators:
        d = asdict(a)
        knows = d.pop("knows")
        if knows is None:
            d.pop("confidence_credit"), d.pop("guess_length_bias")
        else:
            d["knowledge"] = len(knows) / len(all_facts())
            d["knows"] = sorted(knows)
        out.append(d)
    return out
