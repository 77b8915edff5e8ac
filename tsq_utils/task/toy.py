"""The toy task: chain-arithmetic problems, an overthinking teacher, the oracle, the prompt and the ToyTask."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

import pandas as pd

from ..core.config import ToyWorldConfig, stage_seed
from .base import Task
from .format import STEP_SEP, THINK_CLOSE, THINK_OPEN

LABELS = "abcdefgh"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
PAD, UNK = "<pad>", "<unk>"
# The toy reasoner's chat format: the prompt ends with "<think>\n", as R1's does.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "\n{{ m['content'] }}" + END + "\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "\n" + THINK_OPEN + "\n{% endif %}"
)


# --------------------------------------------------------------------------- problems


@dataclass
class Term:
    label: str
    op: str  # "" for the starting value, else "+" or "-"
    value: int

    def text(self) -> str:
        """The term as written in the question and step headers, e.g. 'b+6'."""
        return f"{self.label}{self.op}{self.value}"


@dataclass
class ToyProblem:
    problem_id: str
    k: int
    terms: list[Term]

    @property
    def question(self) -> str:
        """The question line, e.g. 'Q:a5,b+6,c-3'."""
        return "Q:" + ",".join(t.text() for t in self.terms)

    def totals(self) -> list[int]:
        """The running totals after each term."""
        out, tot = [], 0
        for t in self.terms:
            tot = t.value if not t.op else (tot + t.value if t.op == "+" else tot - t.value)
            out.append(tot)
        return out

    @property
    def answer(self) -> int:
        """The final total."""
        return self.totals()[-1]


def make_problem(rng: random.Random, k: int, max_value: int = 49, problem_id: str = "") -> ToyProblem:
    """A random chain of k terms whose running totals stay within [0, max_value]."""
    if not 2 <= k <= len(LABELS):
        raise ValueError(f"k must be in 2..{len(LABELS)}, got {k}")
    start = rng.randint(1, 9) if rng.random() < 0.5 else rng.randint(1, max_value)
    terms, tot = [Term("a", "", start)], start
    for i in range(1, k):
        ops: list[str] = []
        while not ops:  # below max_value 17 some operands fit neither way (e.g. 9 from 4 with max 9): draw again
            v = rng.randint(1, 9)
            ops = [o for o in "+-" if 0 <= (tot + v if o == "+" else tot - v) <= max_value]
        op = rng.choice(ops)
        tot = tot + v if op == "+" else tot - v
        terms.append(Term(LABELS[i], op, v))
    return ToyProblem(problem_id or f"toy-{k}-{rng.getrandbits(32):08x}", k, terms)


def make_problems(n: int, seed: int, k_min: int = 2, k_max: int = 8, max_value: int = 49,
                  split: str = "train") -> list[ToyProblem]:
    """n problems with k spread evenly over k_min..k_max, seeded; ids encode the split."""
    if k_min > k_max:
        raise ValueError(f"k_min ({k_min}) exceeds k_max ({k_max})")
    rng = random.Random(f"{split}:{seed}")
    ks = [k_min + i % (k_max - k_min + 1) for i in range(n)]
    return [make_problem(rng, k, max_value, f"{split}-{i:05d}-k{k}") for i, k in enumerate(ks)]


# --------------------------------------------------------------------------- teacher traces and the oracle


def _start_step(t: Term, verbose: bool) -> str:
    return f"We start with {t.text()}, so the total is {t.value}." if verbose else f"{t.text()}: {t.value}"


def _op_step(t: Term, prev: int, result: int, verbose: bool) -> str:
    eq = f"{prev}{t.op}{t.value}={result}"
    if verbose:
        return f"Next is {t.text()}. The total was {prev}, and {eq}, so now it is {result}."
    return f"{t.text()}: {eq}"


def _check_step(t: Term, prev: int, right: int, claimed: int) -> str:
    head = f"Wait, let me check {t.text()}: {prev}{t.op}{t.value}={right}."
    if claimed == right:
        return head + " Yes."
    return head + f" Not {claimed}, so the total is {right}."


def answer_text(answer: int) -> str:
    """The answer part that follows the thinking part."""
    return f"\n{THINK_CLOSE}\n\nThe answer is \\boxed{{{answer}}}."


def _op_phrasing(t: Term, prev: int, result: int, style: int) -> str:
    """Phrasing `style` of an operation step (local teacher): 0 is the oracle's terse step, 3 the longest; all four
    carry the same equation, and each opens with its own first word."""
    eq = f"{prev}{t.op}{t.value}={result}"
    if style == 0:
        return f"{t.text()}: {eq}"
    if style == 1:
        return f"So {t.text()}: {eq}, total {result}."
    if style == 2:
        return f"Then {t.text()}: the total was {prev}, and {eq}."
    return f"Next is {t.text()}. The total was {prev}, and {eq}, so now it is {result}."


def carry_slip(right: int) -> int:
    """The one wrong total a carry slip writes: the tens digit off by one."""
    return right - 10 if right >= 10 else right + 10


def _draw(rng: random.Random, probs: list[float], temperature: float = 1.0) -> int:
    """An index drawn from probs sharpened by a temperature (0: the most likely); one rng.random() per draw if T > 0."""
    if temperature == 0:
        return max(range(len(probs)), key=lambda i: probs[i])
    w = [x ** (1.0 / temperature) if x > 0 else 0.0 for x in probs]
    u, acc = rng.random() * sum(w), 0.0
    for i, x in enumerate(w):
        acc += x
        if u < acc:
            return i
    return len(w) - 1


def _review_step(problem: ToyProblem) -> str:
    expr = str(problem.terms[0].value) + "".join(f"{t.op}{t.value}" for t in problem.terms[1:])
    return f"Let me double-check the whole chain: {expr}={problem.totals()[-1]}."


def local_trace(problem: ToyProblem, rng: random.Random, cfg: ToyWorldConfig, temperature: float = 1.0,
                record: dict | None = None) -> str:
    """One completion of the local teacher, every decision sharpened by temperature as a model sampled at T would take
    it (1: the teacher itself); record, if given, receives the decisions (styles, checks, slips, uncaught, review).

    Each decision is the one a model takes at a single token: after a blank line the first word picks among checking
    the last step, the phrasings of the next step (or, after the last step, the review and the answer), with their
    joint chances.
    """
    totals, terms = problem.totals(), problem.terms
    w = [float(x) / sum(cfg.phrasings) for x in cfg.phrasings]
    c, r = cfg.p_check, cfg.p_review
    verbose = _draw(rng, [1 - cfg.p_verbose_start, cfg.p_verbose_start], temperature) == 1
    steps = [_start_step(terms[0], verbose=verbose)]
    styles, checks, slips = [], [], []
    tot = totals[0]  # the running total as written: a slip that no check catches carries on
    review, style = False, _draw(rng, w, temperature)
    for i, t in enumerate(terms[1:], start=1):
        right = tot + t.value if t.op == "+" else tot - t.value
        slip = _draw(rng, [1 - cfg.p_slip, cfg.p_slip], temperature) == 1
        claimed = carry_slip(right) if slip else right
        steps.append(_op_phrasing(t, tot, claimed, style))
        styles.append(style)
        slips.append(slip)
        last = i == len(terms) - 1
        # the word after this step: a check (c), or what comes next (a phrasing; after the last step the review or
        # the answer) sharing 1 - c; a check is a habit, drawn whether or not the step slipped
        after = [r, 1 - r] if last else w
        pick = _draw(rng, [c] + [(1 - c) * x for x in after], temperature)
        check = pick == 0
        checks.append(check)
        if check:
            steps.append(_check_step(t, tot, right, claimed))
            pick = 1 + _draw(rng, after, temperature)  # the word after the check
        tot = right if check else claimed
        if last:
            review = pick == 1
        else:
            style = pick - 1
    if review:  # the review recomputes the chain from the question, so it also catches a slip carried so far
        steps.append(_review_step(problem))
        tot = totals[-1]
    if record is not None:
        record.update(styles=styles, checks=checks, slips=slips, review=review, correct=tot == totals[-1],
                      uncaught=sum(s and not k for s, k in zip(slips, checks)))
    return STEP_SEP.join(steps) + answer_text(tot)


def teacher_trace(problem: ToyProblem, rng: random.Random, cfg: ToyWorldConfig) -> str:
    """One teacher completion: the local teacher's, or the habit teacher's (concise, or overthinking with checks,
    slips that are always caught, and a review)."""
    if cfg.teacher == "local":
        return local_trace(problem, rng, cfg)
    concise = rng.random() < cfg.p_concise
    totals = problem.totals()
    steps = []
    first = problem.terms[0]
    # The first step always shows the habit: an overthinking trace opens verbosely, so the model's first-token choice
    # is concise vs overthinking with odds p_concise : 1 - p_concise (greedy decoding then overthinks, as R1-style
    # models do).
    steps.append(_start_step(first, verbose=not concise))
    for i, t in enumerate(problem.terms[1:], start=1):
        prev, right = totals[i - 1], totals[i]
        if concise:
            steps.append(_op_step(t, prev, right, verbose=False))
            continue
        verbose = rng.random() < cfg.p_verbose_step
        slip = rng.random() < cfg.p_slip
        claimed = right
        if slip:  # a slip is always caught by the check that follows it
            claimed = max(0, right + rng.choice([-2, -1, 1, 2]))
            claimed = right + 1 if claimed == right else claimed
        steps.append(_op_step(t, prev, claimed, verbose))
        if slip or rng.random() < cfg.p_check:
            steps.append(_check_step(t, prev, right, claimed))
    if not concise and rng.random() < cfg.p_review:
        steps.append(_review_step(problem))
    return STEP_SEP.join(steps) + answer_text(totals[-1])


def oracle_trace(problem: ToyProblem) -> str:
    """The shortest correct trace of the toy world: every step concise, no checks, no review."""
    totals = problem.totals()
    steps = [_start_step(problem.terms[0], False)]
    steps += [_op_step(t, totals[i - 1], totals[i], False) for i, t in enumerate(problem.terms[1:], start=1)]
    return STEP_SEP.join(steps) + answer_text(totals[-1])


# --------------------------------------------------------------------------- prompt, parsing, description


def prompt_for(question: str, tokenizer) -> str:
    """The chat-formatted prompt text (ends with '<think>\\n') for a question."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


# the knobs each teacher reads (the manifest and notebook 00 describe the world with them)
TEACHER_KNOBS = {
    "local": ("teacher", "phrasings", "p_verbose_start", "p_check", "p_slip", "p_review"),
    "habit": ("teacher", "p_concise", "p_verbose_step", "p_check", "p_slip", "p_review"),
}


def world_description(cfg: ToyWorldConfig) -> dict:
    """A plain description of the toy task, for manifests and the notebook."""
    return {
        "task": "chain arithmetic: Q:a<start>,b±v,c±v,... ; answer = final total",
        "k_range": [cfg.k_min, cfg.k_max],
        "values": f"start 1..{cfg.max_value}, operands 1..9, running totals in [0, {cfg.max_value}]",
        "teacher": {k: getattr(cfg, k) for k in TEACHER_KNOBS[cfg.teacher]},
    }


def parse_question(question: str, problem_id: str = "") -> ToyProblem:
    """Rebuild a ToyProblem from its question line 'Q:a5,b+6,c-3'; ValueError if malformed."""
    if not question.startswith("Q:"):
        raise ValueError(f"not a toy question: {question!r}")
    parts = question[2:].split(",")
    if not 2 <= len(parts) <= len(LABELS):
        raise ValueError(f"a toy question has 2..{len(LABELS)} terms, got {len(parts)} in {question!r}")
    terms = []
    for i, part in enumerate(parts):
        m = re.fullmatch(r"([a-h])([+-]?)(\d+)", part)
        if not m or m.group(1) != LABELS[i] or (i == 0) != (m.group(2) == ""):
            raise ValueError(f"malformed term {part!r} in {question!r}")
        terms.append(Term(m.group(1), m.group(2), int(m.group(3))))
    return ToyProblem(problem_id, len(terms), terms)


def teacher_fingerprint(cfg: ToyWorldConfig, n: int = 200) -> str:
    """A hash of n teacher traces drawn with a fixed seed: it changes when the task or the teacher's habits change."""
    rng = random.Random("fingerprint")
    h = hashlib.sha256()
    for _ in range(n):
        p = make_problem(rng, rng.randint(cfg.k_min, cfg.k_max), cfg.max_value)
        h.update((p.question + "\n" + teacher_trace(p, rng, cfg) + "\x00").encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- the task


def problem_table(problems: list[ToyProblem], tokenizer) -> pd.DataFrame:
    """A problems table (problem_id, k, problem, gold, prompt, source) for toy problems."""
    return pd.DataFrame(
        {
            "problem_id": [p.problem_id for p in problems],
            "k": [p.k for p in problems],
            "problem": [p.question for p in problems],
            "gold": [str(p.answer) for p in problems],
            "prompt": [prompt_for(p.question, tokenizer) for p in problems],
            "source": "toy",
        }
    )


def oracle_lengths(problems: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """Tokens of the oracle (shortest correct) trace of each toy problem in a problems table."""
    rows = []
    for pid, k, q in zip(problems["problem_id"], problems["k"], problems["problem"]):
        text = oracle_trace(parse_question(q, pid))
        rows.append({"problem_id": pid, "k": int(k), "oracle_text": text,
                     "oracle_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"])})
    return pd.DataFrame(rows)


# The stage seed of each split (core.config.stage_seed): separate seeds keep the splits disjoint in practice.
SPLIT_SEEDS = {"train": "train-problems", "test": "eval-problems", "dev": "tldr-dev", "heldout": "heldout"}


class ToyTask(Task):
    """The toy world: seeded chain-arithmetic problems, the toy chat prompt, exact-match grading and the oracle."""

    name = "toy"
    grader = "toy"
    has_oracle = True
    splits = ("train", "test", "dev", "heldout")

    def split_size(self, profile, split: str) -> int:
        """The profile's number of problems in a split: notebook 00's held-out checks use as many as the evaluation
        (data.n_eval_problems: 420 on toy, what the shipped reasoner's manifest records), from their own seed."""
        self.check_split(split)
        return {"train": profile.data.n_train_problems, "test": profile.data.n_eval_problems,
                "dev": profile.tldr.n_dev_problems, "heldout": profile.data.n_eval_problems}[split]

    def problems(self, profile, tokenizer, split: str, n: int | None = None) -> pd.DataFrame:
        """Seeded toy problems of a split (its own seed; ids encode the split), spread evenly over k."""
        n = self.split_size(profile, split) if n is None else n
        tw = profile.toyworld
        probs = make_problems(n, stage_seed(profile.seed, SPLIT_SEEDS[split]), tw.k_min, tw.k_max, tw.max_value,
                              split=split)
        return problem_table(probs, tokenizer)

    def prompt(self, problem: str, tokenizer) -> str:
        """The toy chat prompt of a question line."""
        return prompt_for(problem, tokenizer)

    def oracle_text(self, problem: str, problem_id: str = "") -> str:
        """The oracle trace of a question line."""
        return oracle_trace(parse_question(problem, problem_id))

    def oracle_lengths(self, problems: pd.DataFrame, tokenizer) -> pd.DataFrame:
        """Per problem: problem_id, k, oracle_text, oracle_tokens."""
        return oracle_lengths(problems, tokenizer)

    def demo_example(self, profile, tokenizer) -> dict:
        """The k = 4 demo problem of a fixed seed, its prompt and the oracle's tokens."""
        demo = make_problem(random.Random(0), k=4, max_value=profile.toyworld.max_value, problem_id="demo")
        oracle = len(tokenizer(oracle_trace(demo), add_special_tokens=False)["input_ids"])
        return {"problem_id": "demo", "problem": demo.question, "gold": str(demo.answer),
                "prompt": prompt_for(demo.question, tokenizer), "grader": self.grader, "oracle_tokens": oracle}
