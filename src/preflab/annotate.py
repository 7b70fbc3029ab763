"""Stage 3, annotate (AI feedback): a judge votes on candidate pairs, written as the comparison JSONL people's
votes are, so `preflab reward` / `preflab dpo` train on it like any other votes.

1. read the pairs: `pairs.jsonl` from `preflab generate --pairs` ({prompt, response_a, response_b}), a
   `responses.jsonl` (every pair of distinct responses), or prompt/chosen/rejected rows (chosen shown as A);
   a bad row stops the run with its file:line
2. load the judge (`--judge SPEC`):
     * `world`            the tutoring world's true utility (the oracle);
     * `module:function`  a Python reward `f(prompt, response) -> float`, higher is better;
     * a reward-model folder (what `preflab reward` writes, or an ensemble);
   these three go through the one reward interface (`preflab.reward.interface.load_reward`) and the judge's
   margin is r(A) - r(B). Anything else is a causal LM (a Hugging Face directory, a run folder, a .gguf or
   `smollm2`) asked in writing (`LMJudge`, Bai et al. 2022, "Constitutional AI", RLAIF):
     * the prompt is the principles (`--constitution FILE`), the question, Response A, Response B and
       "Which response is better? Answer A or B.", through the chat template where the tokenizer has one;
     * the single-order score is s = log p(A) - log p(B) of the next token after the prompt;
     * the pair is asked in both orders: s1 with (x, y) shown as (A, B), s2 with (y, x). A judge that simply
       likes the letter A (position bias, Zheng et al. 2023, "Judging LLM-as-a-judge", sec. 3.3) adds the
       same term to s1 and s2, so the margin (s1 - s2) / 2 cancels it and (s1 + s2) / 2 measures it;
       swapping the pair negates the margin exactly.
3. vote: x is chosen when the margin > 0, y when < 0; a tie when the margin is 0 or |margin| < `--tie-margin`
   (a tie keeps the shown order, as people's ties do)
4. write the votes (`--out`, default `<run folder>/votes.jsonl`), and with `--truth world` the judge's
   agreement with the world's true utility (95% bootstrap interval over pairs) in `summary.json`; with
   `--people FILE` its agreement with people's votes on the same pairs (matched by prompt and the two
   responses, in either order; 95% bootstrap interval over those votes)

One row per pair (the `world/annotators.py` format, plus what the judge said):

    {"prompt": ..., "chosen": ..., "rejected": ..., "tie": false, "annotator": "judge:world",
     "chosen_position": "A", "chosen_length": 9, "rejected_length": 4, "length_unit": "words",
     "judge": "world", "judge_margin": 1.5, "source": "pairs.jsonl:3"}

`judge_margin` is |margin| (chosen minus rejected, on the judge's own scale: utility units, reward units or
nats); it is not written as `margin`, which `preflab reward` would read as a Llama-2 margin, unless
`--write-margin true`. The LM judge adds `judge_position_bias` ((s1 + s2) / 2, nats).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from preflab.config import ConfigError, RunConfig, check, opt
from preflab.data.preferences import DataError, completion_text, parse_preference, read_jsonl, write_jsonl
from preflab.data.text import n_words
from preflab.data.tokenize import collate, encode_prompt, position_ids
from preflab.models import ModelError, load_model
from preflab.runs import Run, progress, seed_everything
from preflab.stages import stage
from preflab.training import set_threads

JUDGE_TEMPLATE = (
    "Judge two responses to a question by these principles:\n{principles}\n\n"
    "Question:\n{question}\n\n"
    "Response A:\n{first}\n\n"
    "Response B:\n{second}\n\n"
    "Which response is better? Answer A or B."
)
DEFAULT_CONSTITUTION = (
    "1. A correct answer is better than a wrong one.\n"
    "2. Saying you do not know is better than a confident wrong answer.\n"
    "3. Be polite, never rude.\n"
    "4. Be concise: no filler."
)


@dataclass(kw_only=True)
class AnnotateConfig(RunConfig):
    judge: str = opt(
        "",
        "who votes: 'world' (true utility), module:function (a reward f(prompt, response)), a reward-model folder, "
        "or a causal LM (directory, run folder, .gguf, 'smollm2') asked with --constitution",
    )
    pairs: str = opt("", "pairs.jsonl from `preflab generate --pairs` (or responses.jsonl, or prompt/chosen/rejected)")
    out: str = opt("", "the comparison JSONL to write (default <out-dir>/votes.jsonl)")
    out_dir: str = opt("", "run folder for config.yaml, metrics.jsonl and summary.json (default runs/annotate-<time>)")
    constitution: str = opt("", "LM judge: a text file of principles (default: four built-in tutoring principles)")
    truth: str = opt("", "'world': also measure agreement with the world's true utility ('' : no truth)")
    people: str = opt(
        "",
        "people's votes on the same pairs (comparison JSONL, e.g. the demo's votes/heldout.jsonl): also measure "
        "agreement with them, pairs matched by prompt and the two responses ('': none)",
    )
    tie_margin: float = opt(0.0, "a tie when |margin| < this (a margin of exactly 0 is always a tie)")
    max_pairs: int = opt(0, "judge the first N pairs only (0: all)")
    batch_size: int = opt(16, "prompts scored together (reward models and LM judges)")
    max_length: int = opt(0, "LM judge: keep the last N tokens of its prompt (0: no limit)")
    write_margin: bool = opt(False, "also write judge_margin as `margin` (preflab reward reads it as a Llama-2 margin)")

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.judge), "judge is required: give --judge (world, module:function, a reward model or an LM)")
        check(bool(self.pairs), "pairs is required: give --pairs FILE (pairs.jsonl from `preflab generate --pairs`)")
        check(self.truth in ("", "world"), f"truth must be '' or 'world', got {self.truth!r}")
        check(self.tie_margin >= 0, f"tie_margin must be >= 0, got {self.tie_margin}")
        check(self.max_pairs >= 0, f"max_pairs must be >= 0, got {self.max_pairs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.max_length >= 0, f"max_length must be >= 0, got {self.max_length}")


# ---- 1. pairs ------------------------------------------------------------------------------------------


def parse_pair(row, src: str, notes=None) -> list[dict]:
    """A row as pairs to judge, [{prompt, a, b, source}]: a pairs.jsonl or responses.jsonl row (the collection
    app's reader) or a prompt/chosen/rejected row (chosen as A)."""
    from preflab.collect.cli import parse_pair_row

    if isinstance(row, dict) and ("chosen" in row or "rejected" in row):
        pref = parse_preference(row, src, notes)
        if pref.prompt is None:
            raise DataError(src, "annotate needs a 'prompt' field (the judge reads the question)", "add 'prompt'")
        a, b = completion_text(pref.chosen, src, "chosen"), completion_text(pref.rejected, src, "rejected")
        return [{"prompt": pref.prompt, "a": a, "b": b, "source": src[-200:]}]
    return [
        {"prompt": p["prompt"], "a": p["response_a"], "b": p["response_b"], "source": p["source"]}
        for p in parse_pair_row(row, src, notes)
    ]


def read_pairs(path: str | Path, max_pairs: int = 0) -> list[dict]:
    pairs = [p for row in read_jsonl(path, parse_pair).rows for p in row]
    return pairs[:max_pairs] if max_pairs else pairs


# ---- 2. judges: (prompts, xs, ys) -> margins (positive: x is better) ------------------------------------


class RewardJudge:
    """A scalar reward as a judge: margin = r(x) - r(y)."""

    def __init__(self, reward, kind: str, batch_size: int = 16):
        self.reward, self.kind, self.batch_size = reward, kind, batch_size
        self.position_bias = None  # a scalar reward sees one response at a time: no shown order

    def __call__(self, prompts: list, xs: list[str], ys: list[str]) -> torch.Tensor:
        margins = []
        for s in range(0, len(prompts), self.batch_size):
            p, x, y = prompts[s : s + self.batch_size], xs[s : s + self.batch_size], ys[s : s + self.batch_size]
            scores = self.reward(p + p, x + y).float().cpu()
            margins.append(scores[: len(p)] - scores[len(p) :])
        return torch.cat(margins) if margins else torch.zeros(0)


def question_text(prompt) -> str:
    """A prompt as text for the judge: the message itself when it is one, else `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def answer_token_ids(tokenizer, leading_space: bool) -> tuple[int, int]:
    """Token ids of the answers "A" and "B".

    After a chat template's assistant prefix the answer starts a turn, so "A"/"B" (no space); after a plain
    "...\\nAnswer:" it follows a space, so " A"/" B" where each is one token, falling back to "A"/"B" when the
    tokenizer splits the space off. Each must be a single token and the two must differ."""
    variants = ([(" A", " B")] if leading_space else []) + [("A", "B")]
    for a, b in variants:
        ids_a = tokenizer(a, add_special_tokens=False)["input_ids"]
        ids_b = tokenizer(b, add_special_tokens=False)["input_ids"]
        if len(ids_a) == 1 and len(ids_b) == 1 and ids_a != ids_b:
            return ids_a[0], ids_b[0]
    raise ModelError("the judge's tokenizer has no single token for 'A' and 'B': it cannot answer A or B")


class LMJudge:
    """A causal LM asked "Which response is better? Answer A or B." in both orders (module docstring, step 2)."""

    kind = "lm"

    def __init__(self, model, tokenizer, principles: str, batch_size: int = 16, max_length: int = 0):
        self.model, self.tokenizer, self.principles = model, tokenizer, principles.strip()
        self.batch_size, self.max_length = batch_size, max_length
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.id_a, self.id_b = answer_token_ids(tokenizer, leading_space=not self.chat)
        self.position_bias = None  # [N] (s1 + s2) / 2 of the last call, nats

    def prompt_ids(self, prompt, first: str, second: str) -> list[int]:
        text = JUDGE_TEMPLATE.format(
            principles=self.principles, question=question_text(prompt), first=first, second=second
        )
        if self.chat:
            ids = encode_prompt(self.tokenizer, [{"role": "user", "content": text}])  # generation prompt added
        else:
            ids = encode_prompt(self.tokenizer, text + "\nAnswer:")
        return ids[-self.max_length :] if self.max_length else ids

    @torch.no_grad()
    def order_scores(self, prompts_ids: list[list[int]]) -> torch.Tensor:
        """log p(A) - log p(B) of the token after each prompt, in batches sorted by length."""
        device = next(self.model.parameters()).device
        order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
        out = torch.empty(len(order))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            batch = collate([prompts_ids[i] for i in idx], [[] for _ in idx], self.tokenizer.pad_token_id)
            P = int(batch["prompt_length"])  # left padding: column P - 1 is every row's last prompt token
            ids, mask = batch["input_ids"][:, :P].to(device), batch["attention_mask"][:, :P].to(device)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
            ).logits[:, -1]
            logps = torch.log_softmax(logits.float(), dim=-1)
            out[idx] = (logps[:, self.id_a] - logps[:, self.id_b]).cpu()
        return out

    def __call__(self, prompts: list, xs: list[str], ys: list[str]) -> torch.Tensor:
        n = len(prompts)
        ids = [self.prompt_ids(p, x, y) for p, x, y in zip(prompts, xs, ys)]  # x shown as A
        ids += [self.prompt_ids(p, y, x) for p, x, y in zip(prompts, xs, ys)]  # y shown as A
        scores = self.order_scores(ids)
        s1, s2 = scores[:n], scores[n:]
        self.position_bias = (s1 + s2) / 2  # the "A" letter's pull, the same in both orders
        return (s1 - s2) / 2  # antisymmetric: swapping x and y swaps s1 and s2


def is_reward_model(spec: str) -> bool:
    from preflab.reward.model import reward_dir

    try:
        reward_dir(spec)
    except ModelError:
        return False
    return True


def load_judge(config: AnnotateConfig):
    """The judge a spec names (module docstring, step 2)."""
    from preflab.reward.interface import load_reward

    spec = config.judge
    scalar = spec == "world" or (":" in spec and not Path(spec).exists()) or is_reward_model(spec)
    if scalar:
        check(not config.constitution, f"--constitution is for an LM judge; {spec!r} is a reward, not an LM")
        kind = "world" if spec == "world" else "function" if ":" in spec and not Path(spec).exists() else "reward_model"
        return RewardJudge(load_reward(spec), kind, config.batch_size)
    principles = DEFAULT_CONSTITUTION
    if config.constitution:
        path = Path(config.constitution)
        check(path.is_file(), f"constitution file {config.constitution!r} not found")
        principles = path.read_text(encoding="utf-8")
        check(bool(principles.strip()), f"constitution file {config.constitution!r} is empty")
    model, tokenizer = load_model(spec)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return LMJudge(model, tokenizer, principles, config.batch_size, config.max_length)


def judge_pairs(judge, pairs: list[dict], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(margins [N], position bias [N] or None) over all pairs, with a progress bar."""
    margins, bias = [], []
    bar = progress(total=len(pairs), desc="annotate", unit="pair")
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        margins.append(judge([p["prompt"] for p in chunk], [p["a"] for p in chunk], [p["b"] for p in chunk]))
        if judge.position_bias is not None:
            bias.append(judge.position_bias)
        bar.update(len(chunk))
    bar.close()
    return torch.cat(margins), (torch.cat(bias) if bias else None)


# ---- 3. votes ------------------------------------------------------------------------------------------


def is_tie(margin: float, tie_margin: float) -> bool:
    return margin == 0 or abs(margin) < tie_margin


def vote_row(pair: dict, margin: float, judge: str, tie_margin: float = 0.0, write_margin: bool = False) -> dict:
    """One comparison row (module docstring): x = pair["a"] is chosen when margin > 0; a tie keeps A first."""
    tie = is_tie(margin, tie_margin)
    a_wins = tie or margin > 0
    chosen, rejected = (pair["a"], pair["b"]) if a_wins else (pair["b"], pair["a"])
    row = {
        "prompt": pair["prompt"],
        "chosen": chosen,
        "rejected": rejected,
        "tie": tie,
        "annotator": f"judge:{judge}",
        "chosen_position": "A" if a_wins else "B",
        "chosen_length": n_words(chosen),
        "rejected_length": n_words(rejected),
        "length_unit": "words",
        "judge": judge,
        "judge_margin": abs(float(margin)),
        "source": pair["source"],
    }
    if write_margin:
        row["margin"] = row["judge_margin"]
    return row


# ---- 4. agreement with the truth -----------------------------------------------------------------------


def world_agreement(pairs: list[dict], margins: torch.Tensor, tie_margin: float = 0.0, seed: int = 0):
    """(Estimate of agreement, pairs of equal true utility left out): per pair of unequal true utility, 1 when
    the judge prefers the better one, 0.5 for a judge's tie, 0 otherwise; 95% bootstrap over pairs."""
    from preflab.evaluate.stats import bootstrap_mean
    from preflab.world import true_utility

    outcomes, equal = [], 0
    for pair, margin in zip(pairs, margins.tolist()):
        try:
            d = true_utility(pair["prompt"], pair["a"]).total - true_utility(pair["prompt"], pair["b"]).total
        except ValueError as exc:  # not a world question
            raise DataError(pair["source"], f"--truth world: {exc}", "use --truth world on world pairs only") from None
        if d == 0:
            equal += 1
        elif is_tie(margin, tie_margin):
            outcomes.append(0.5)
        else:
            outcomes.append(float((margin > 0) == (d > 0)))
    return bootstrap_mean(outcomes, seed=seed), equal


def people_key(prompt, x: str, y: str) -> tuple[str, str, str]:
    """A pair's identity whichever response was shown first: the prompt (as JSON) and the two responses, sorted."""
    import json

    return (json.dumps(prompt, sort_keys=True), *sorted((x, y)))


def read_people(path: str | Path) -> dict[tuple, list[dict]]:
    """People's votes (comparison JSONL: prompt, chosen, rejected, optional tie) by `people_key`."""
    import json

    votes: dict[tuple, list[dict]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        src = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(src, f"not JSON: {exc}", "one JSON object per line") from None
        if not isinstance(row, dict) or not all(k in row for k in ("prompt", "chosen", "rejected")):
            raise DataError(src, "a vote needs prompt, chosen and rejected", "give people's comparison rows")
        votes.setdefault(people_key(row["prompt"], row["chosen"], row["rejected"]), []).append(row)
    return votes


def people_agreement(
    pairs: list[dict], margins: torch.Tensor, people: dict[tuple, list[dict]], tie_margin: float = 0.0, seed: int = 0
):
    """(Estimate, votes counted, people's ties left out, pairs with no vote): per person's non-tie vote on a
    judged pair, 1 when the judge prefers the response the person chose, 0.5 for a judge's tie, 0 otherwise;
    the mean with a 95% bootstrap interval over those votes."""
    from preflab.evaluate.stats import bootstrap_mean

    outcomes, ties, unmatched = [], 0, 0
    for pair, margin in zip(pairs, margins.tolist()):
        votes = people.get(people_key(pair["prompt"], pair["a"], pair["b"]), [])
        unmatched += not votes
        for vote in votes:
            if vote.get("tie"):
                ties += 1
            elif is_tie(margin, tie_margin):
                outcomes.append(0.5)
            else:
                outcomes.append(float((pair["a"] if margin > 0 else pair["b"]) == vote["chosen"]))
    return bootstrap_mean(outcomes, seed=seed), len(outcomes), ties, unmatched


@stage(AnnotateConfig)
def annotate(config: AnnotateConfig) -> dict:
    set_threads(config.threads)
    seed_everything(config.seed)

    # 1. pairs (read first: a bad row stops the run before any model loads)
    pairs = read_pairs(config.pairs, config.max_pairs)
    if config.out and Path(config.out).is_dir():
        raise ConfigError(f"out must be a .jsonl file to write, got the folder {config.out!r} (see --out-dir)")

    people = read_people(config.people) if config.people else None  # (also read before any model loads)

    # 2. judge
    judge = load_judge(config)
    run = Run(config.out_dir or None, "annotate", config, tensorboard=False)
    margins, position_bias = judge_pairs(judge, pairs, batch_size=max(config.batch_size, 64))

    # 3. votes
    rows = [
        vote_row(p, m, config.judge, config.tie_margin, config.write_margin) for p, m in zip(pairs, margins.tolist())
    ]
    if position_bias is not None:
        for row, b in zip(rows, position_bias.tolist()):
            row["judge_position_bias"] = b
    out = Path(config.out) if config.out else run.dir / "votes.jsonl"
    write_jsonl(out, rows)

    # 4. summary (and agreement with the world's true utility)
    ties = sum(r["tie"] for r in rows)
    metrics = {"annotate/tie_rate": ties / max(len(rows), 1)}
    summary = {"judge": config.judge, "judge_kind": judge.kind, "pairs": len(rows), "ties": ties}
    if position_bias is not None:
        metrics["annotate/position_bias"] = position_bias.mean().item()
    if config.truth == "world":
        agreement, equal = world_agreement(pairs, margins, config.tie_margin, config.seed)
        metrics["annotate/agreement"] = agreement.mean
        if position_bias is not None:  # what asking once (x shown as A) would have scored: s1 = bias + margin
            one_order, _ = world_agreement(pairs, position_bias + margins, config.tie_margin, config.seed)
            metrics["annotate/agreement_one_order"] = one_order.mean
    if people is not None:
        with_people, counted, people_ties, unmatched = people_agreement(
            pairs, margins, people, config.tie_margin, config.seed
        )
        check(counted > 0, f"--people {config.people!r}: no non-tie vote matches a judged pair (prompt + responses)")
        metrics["annotate/people_agreement"] = with_people.mean
    run.log(0, metrics)
    summary.update({k.split("/")[-1]: v for k, v in metrics.items()})
    if config.truth == "world":
        summary.update({"agreement_low": agreement.low, "agreement_high": agreement.high, "truth_ties": equal})
    if people is not None:
        summary.update(
            {
                "people_agreement_low": with_people.low,
                "people_agreement_high": with_people.high,
                "people_votes": counted,
                "people_ties": people_ties,
                "pairs_without_people": unmatched,
            }
        )
    summary["votes_file"] = str(out)
    return run.finish(summary)
