"""TLDR dynamic re-weighting (arXiv 2506.02678): the rule, the two data pools, and SFT on their mixture with TRL.

Weights are (w_short, w_long): the System-1 (short CoT) and System-2 (long CoT) pools. Accuracies are
fractions in [0, 1]. The pure logic (benefits, update_weights, choose_checkpoint, MixtureSchedule) comes
first; then the toy world's pools and dev set; then the training loop: TRL's SFTTrainer whose batches come
from a MixtureBatchSampler that draws every batch's pools from the schedule's current weights, and a
ReweightCallback that evaluates the dev set every E optimizer steps and feeds MixtureSchedule.observe.

Choices:
- Coinciding reference points (T_L = T_S or A_L = A_S) make the benefits undefined: a ValueError by
  default; pass min_gap > 0 to floor the denominators instead (tiny CI runs, where they can tie).
- choose_checkpoint keeps the paper's strict inequality (dev_acc > acc_floor * A_L, compared after rounding to 9
  decimals, so 0.56 is not above 0.7 * 0.8); ties in dev tokens go to the higher dev accuracy, then the earlier
  step. None when no checkpoint qualifies: the caller must then say so, not pick silently.
- The static 1:1 mix is the same schedule with update_every = math.inf: weights never change.
- min_gap may be one floor for both gaps or a pair (token floor, accuracy floor); the notebook floors them at the
  dev set's resolution (1 token, one dev problem) when TLDRConfig.floor_gaps is on.
- Training draws each batch when the trainer asks for it, right after the previous optimizer step and its
  callback, so weights re-weighted after step s apply from step s + 1 exactly. (accelerate's prepared data
  loader reads one batch ahead, which would delay them by a step; the mixture loader is therefore a plain
  DataLoader, and training runs on one process.)
- When no checkpoint passes the accuracy floor, the run's final weights are kept and the run says so
  (MixtureRun.chosen is None): the comparison then shows what the method did, not the base model again.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from ..core.artifacts import atomic_dir
from ..core.config import TrainingConfig
from ..model import compat
from ..model.generation import Decoding
from ..task.base import Task
from ..task.registry import training_task
from .dpo_l import _special_tokens_added
from .evaluation import acr
from .sampling import SampleRun, sample_and_grade

SHORT, LONG = 0, 1
POOLS = ("short", "long")


def _finite(name: str, x: float, lo: float | None = None, hi: float | None = None) -> float:
    """x as a float, or ValueError if it is not finite or leaves [lo, hi]."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {x!r}") from None
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be finite and in [{lo}, {hi}], got {x!r}")
    return v


def _gap_floors(min_gap: float | Sequence[float]) -> tuple[float, float]:
    """(token floor, accuracy floor) from one floor for both or a pair; both must be positive."""
    pair = (min_gap, min_gap) if np.isscalar(min_gap) else tuple(min_gap)
    if len(pair) != 2:
        raise ValueError(f"min_gap must be one number or a (token, accuracy) pair, got {min_gap!r}")
    floors = (_finite("min_gap", pair[0]), _finite("min_gap", pair[1]))
    if min(floors) <= 0:
        raise ValueError(f"min_gap must be positive, got {min_gap!r}")
    return floors


def benefits(t_cur: float, a_cur: float, t_s: float, a_s: float, t_l: float, a_l: float,
             min_gap: float | Sequence[float] | None = None) -> tuple[float, float]:
    """(b_short, b_long): how far the current model is too long, and how much accuracy it lost, both >= 0."""
    t_cur, t_s, t_l = (_finite(n, v, lo=0.0) for n, v in (("t_cur", t_cur), ("t_s", t_s), ("t_l", t_l)))
    a_cur, a_s, a_l = (_finite(n, v, 0.0, 1.0) for n, v in (("a_cur", a_cur), ("a_s", a_s), ("a_l", a_l)))
    dt, da = abs(t_l - t_s), abs(a_l - a_s)
    if min_gap is None:
        if dt == 0:
            raise ValueError(f"T_L = T_S = {t_l}: the token benefit is undefined (pass min_gap to floor it)")
        if da == 0:
            raise ValueError(f"A_L = A_S = {a_l}: the accuracy benefit is undefined (pass min_gap to floor it)")
    else:
        gap_t, gap_a = _gap_floors(min_gap)
        dt, da = max(dt, gap_t), max(da, gap_a)
    return max((t_cur - t_s) / dt, 0.0), max((a_l - a_cur) / da, 0.0)


def update_weights(w: Sequence[float], b: Sequence[float], eta: float = 4.0,
                   smoothing: float = 1e-4) -> tuple[float, float]:
    """softmax(log w + eta*b), then (1-c)*w + c/2, renormalised."""
    w_arr = np.asarray(w, dtype=float)
    b_arr = np.asarray(b, dtype=float)
    if w_arr.shape != (2,) or b_arr.shape != (2,):
        raise ValueError(f"w and b must each hold two numbers (short, long), got {w!r} and {b!r}")
    if not np.isfinite(w_arr).all() or (w_arr < 0).any() or not math.isclose(w_arr.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"w must be two non-negative weights summing to 1, got {w!r}")
    if not np.isfinite(b_arr).all():
        raise ValueError(f"b must be finite, got {b!r}")
    _finite("eta", eta, lo=0.0)
    c = _finite("smoothing", smoothing, 0.0, 1.0)
    with np.errstate(divide="ignore"):  # a zero weight (smoothing = 0) has log -inf and stays 0
        logits = np.log(w_arr) + eta * b_arr
    # subtracting the max keeps exp finite for any eta*b
    e = np.exp(logits - logits.max())
    new = e / e.sum()
    new = (1.0 - c) * new + c / 2.0
    new = new / new.sum()
    return float(new[SHORT]), float(new[LONG])


def choose_checkpoint(records: Sequence[dict], a_l: float, acc_floor: float = 0.7) -> dict | None:
    """The record with the fewest dev tokens among those with dev_acc > acc_floor * A_L (None if none)."""
    a_l = _finite("a_l", a_l, 0.0, 1.0)
    acc_floor = _finite("acc_floor", acc_floor, 0.0, 1.0)
    best = None
    for i, rec in enumerate(records):
        missing = [k for k in ("step", "dev_acc", "dev_tokens") if k not in rec]
        if missing:
            raise ValueError(f"checkpoint record {i} lacks key(s) {missing}: {rec!r}")
        acc = _finite(f"records[{i}].dev_acc", rec["dev_acc"], 0.0, 1.0)
        tokens = _finite(f"records[{i}].dev_tokens", rec["dev_tokens"], lo=0.0)
        # rounded so that float noise does not decide the boundary: 0.7 * 0.8 is 0.5599999999999999
        if round(acc - acc_floor * a_l, 9) <= 0:
            continue
        key = (tokens, -acc, rec["step"])  # fewest tokens, then higher accuracy, then earlier step
        if best is None or key < best[0]:
            best = (key, rec)
    return dict(best[1]) if best is not None else None


def draw_pools(weights: Sequence[float], n: int, rng: np.random.Generator) -> np.ndarray:
    """n pool labels (SHORT = 0 or LONG = 1) drawn i.i.d. with probabilities weights."""
    w = np.asarray(weights, dtype=float)
    if w.shape != (2,) or (w < 0).any() or not math.isclose(w.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"weights must be two non-negative numbers summing to 1, got {weights!r}")
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return (rng.random(int(n)) < w[LONG]).astype(np.int64)


@dataclass
class MixtureSchedule:
    """The weights of the two pools over training: draws each example's pool, re-weights every update_every steps."""

    t_s: float
    a_s: float
    t_l: float
    a_l: float
    update_every: float = 32  # optimizer steps between re-weightings; math.inf = static mix
    eta: float = 4.0
    smoothing: float = 1e-4
    seed: int = 0
    min_gap: float | tuple[float, float] | None = None
    weights: tuple[float, float] = (0.5, 0.5)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        every = self.update_every
        if not (every == math.inf or (int(every) == every and every >= 1)):
            raise ValueError(f"update_every must be a positive integer or math.inf, got {self.update_every!r}")
        # validate the reference points and weights once, up front
        benefits(self.t_l, self.a_l, self.t_s, self.a_s, self.t_l, self.a_l, self.min_gap)
        self.weights = update_weights(self.weights, (0.0, 0.0), eta=0.0, smoothing=0.0)
        self._rng = np.random.default_rng(self.seed)
        if not self.history:
            self.history.append({"step": 0, "w_short": self.weights[SHORT], "w_long": self.weights[LONG]})

    @classmethod
    def from_config(cls, cfg, t_s: float, a_s: float, t_l: float, a_l: float, seed: int = 0,
                    static: bool = False, min_gap: float | Sequence[float] | None = None) -> MixtureSchedule:
        """A schedule from a TLDRConfig (static=True gives the 1:1 mix that never re-weights)."""
        return cls(t_s=t_s, a_s=a_s, t_l=t_l, a_l=a_l, update_every=math.inf if static else cfg.update_every,
                   eta=cfg.eta, smoothing=cfg.smoothing, seed=seed, min_gap=min_gap)

    @property
    def static(self) -> bool:
        """Whether the weights never change."""
        return self.update_every == math.inf

    def is_update_step(self, step: int) -> bool:
        """Whether the weights are re-weighted after this optimizer step."""
        return not self.static and step > 0 and step % int(self.update_every) == 0

    def draw(self, n_steps: int, batch_size: int) -> np.ndarray:
        """Pools (SHORT/LONG) of every example of the next n_steps steps, shape (n_steps, batch_size)."""
        if int(n_steps) != n_steps or n_steps < 0 or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"n_steps must be >= 0 and batch_size >= 1, got {n_steps!r}, {batch_size!r}")
        n_steps, batch_size = int(n_steps), int(batch_size)
        return draw_pools(self.weights, n_steps * batch_size, self._rng).reshape(n_steps, batch_size)

    def observe(self, step: int, t_cur: float, a_cur: float) -> tuple[float, float]:
        """Record a dev evaluation after `step`; re-weight if it is an update step; return the weights."""
        b_short, b_long = benefits(t_cur, a_cur, self.t_s, self.a_s, self.t_l, self.a_l, self.min_gap)
        updated = self.is_update_step(step)
        if updated:
            self.weights = update_weights(self.weights, (b_short, b_long), self.eta, self.smoothing)
        self.history.append({
            "step": int(step), "t_cur": float(t_cur), "a_cur": float(a_cur), "b_short": b_short, "b_long": b_long,
            "updated": updated, "w_short": self.weights[SHORT], "w_long": self.weights[LONG],
        })
        return self.weights

    def history_frame(self) -> pd.DataFrame:
        """The weight trajectory (one row per observation, the first the initial weights)."""
        return pd.DataFrame(self.history)


# --------------------------------------------------------------------------- the two pools (the toy world)

POOL_COLUMNS = ["pool", "problem_id", "k", "prompt", "completion", "n_tokens", "sample_idx"]
ANSWER_COLUMNS = ("problem_id", "k", "prompt", "text", "n_tokens", "correct")


def _check_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """ValueError naming the columns a table lacks."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}")


def easy_max_k(profile) -> int:
    """The hardest difficulty that counts as easy: tldr.easy_max_k, or the midpoint of the toy k range when it is 0."""
    e = profile.tldr.easy_max_k
    return int(e) if e else (profile.toyworld.k_min + profile.toyworld.k_max) // 2


def shortest_correct(answers: pd.DataFrame) -> pd.DataFrame:
    """Per problem, its shortest correct answer (ties: the lowest sample_idx); problems with none are left out."""
    _check_columns(answers, ANSWER_COLUMNS, "answers table")
    ok = answers[answers["correct"].astype(bool)]
    order = ["problem_id", "n_tokens"] + (["sample_idx"] if "sample_idx" in ok.columns else [])
    return ok.sort_values(order, kind="stable").drop_duplicates("problem_id", keep="first")


def _pool(answers: pd.DataFrame, name: str) -> pd.DataFrame:
    """Answers as pool rows (prompt, completion = the answer's text, its tokens)."""
    out = pd.DataFrame({
        "pool": name, "problem_id": answers["problem_id"].astype(str), "k": answers["k"].astype(int),
        "prompt": answers["prompt"], "completion": answers["text"], "n_tokens": answers["n_tokens"].astype(int),
        "sample_idx": answers["sample_idx"].astype(int) if "sample_idx" in answers.columns else 0,
    })
    return out[POOL_COLUMNS].reset_index(drop=True)


def system1_pool(short_answers: pd.DataFrame, easy_max_k: int) -> pd.DataFrame:
    """System-1 pool: every easy problem (k <= easy_max_k) with its short-CoT answer (the shortest correct one)."""
    _check_columns(short_answers, ANSWER_COLUMNS, "short answers table")
    easy = short_answers[short_answers["k"] <= easy_max_k]
    return _pool(shortest_correct(easy), "short")


def system2_pool(samples: pd.DataFrame, easy_max_k: int) -> pd.DataFrame:
    """System-2 pool: every hard problem (k > easy_max_k) with the long model's shortest correct sample, if any."""
    _check_columns(samples, ANSWER_COLUMNS, "samples table")
    hard = samples[samples["k"] > easy_max_k]
    if "finish_reason" in hard.columns:
        hard = hard[hard["finish_reason"] == "stop"]  # an unfinished response is never an answer to learn
    return _pool(shortest_correct(hard), "long")


def oracle_answers(problems: pd.DataFrame, tokenizer, task: Task) -> pd.DataFrame:
    """A task's short-CoT answers (the toy world's): the oracle trace of every problem, as an answers table."""
    _check_columns(problems, ("problem_id", "k", "problem", "prompt"), "problems table")
    o = task.oracle_lengths(problems, tokenizer)
    out = o.rename(columns={"oracle_text": "text", "oracle_tokens": "n_tokens"})
    out = out.merge(problems[["problem_id", "prompt"]], on="problem_id", how="left", validate="one_to_one")
    return out.assign(correct=True, sample_idx=0)[list(ANSWER_COLUMNS) + ["sample_idx"]]


def build_pools(short_answers: pd.DataFrame, samples: pd.DataFrame, easy_max_k: int) -> pd.DataFrame:
    """Both pools in one table (System-1 rows first, pool = "short" / "long"); ValueError when either is empty."""
    s1, s2 = system1_pool(short_answers, easy_max_k), system2_pool(samples, easy_max_k)
    if s1.empty:
        raise ValueError(f"the System-1 pool is empty: no easy problem (k <= {easy_max_k}) has a correct short answer")
    if s2.empty:
        raise ValueError(f"the System-2 pool is empty: no hard problem (k > {easy_max_k}) has a correct sample; "
                         "sample more (sampling.n) or lower tldr.easy_max_k")
    return pd.concat([s1, s2], ignore_index=True)


def dev_problems(profile, tokenizer) -> pd.DataFrame:
    """The dev set: tldr.n_dev_problems held-out problems of the training task's "dev" split (the toy world only)."""
    task = training_task(profile)
    if "dev" not in task.splits:
        raise ValueError(f"TLDR's dev set and System-1 pool are built for the toy world only; profile {profile.name!r} "
                         f"trains on {profile.data.train!r}")
    return task.problems(profile, tokenizer, "dev")


def dev_decoding(profile, seed: int) -> Decoding:
    """The dev set's decoding: one answer per problem at tldr.dev_temperature, evaluation.max_new_tokens long."""
    return Decoding(n=1, temperature=profile.tldr.dev_temperature, top_p=1.0,
                    max_new_tokens=profile.evaluation.max_new_tokens, seed=seed, batch_size=profile.sampling.batch_size)


def dev_eval(model, tokenizer, dev: pd.DataFrame, task: Task, spec: Decoding) -> dict:
    """Dev numbers of a model: mean completion tokens (all responses) and accuracy, graded by the task."""
    # the dev pass must not move the global torch RNG: training continues exactly as it would without it
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        res = sample_and_grade(model, tokenizer, dev, task, spec, SampleRun(progress=False))
    return {"dev_tokens": float(res["n_tokens"].mean()), "dev_acc": float(res["correct"].mean()), "n": int(len(res))}


def reference_points(long: Mapping, short: Mapping, n_dev: int, floor_gaps: bool = True) -> dict:
    """(T_S, A_S), (T_L, A_L) from the dev numbers of the short and the long model, and the gap floors to use."""
    for name, ref in (("long", long), ("short", short)):
        missing = [k for k in ("dev_tokens", "dev_acc") if k not in ref]
        if missing:
            raise ValueError(f"the {name} model's dev numbers lack {missing}: {dict(ref)!r}")
    if int(n_dev) != n_dev or n_dev < 1:
        raise ValueError(f"n_dev must be a positive integer, got {n_dev!r}")
    refs = {"t_s": float(short["dev_tokens"]), "a_s": float(short["dev_acc"]),
            "t_l": float(long["dev_tokens"]), "a_l": float(long["dev_acc"])}
    # one token and one dev problem: differences below these are what the dev set cannot resolve
    refs["min_gap"] = [1.0, 1.0 / n_dev] if floor_gaps else None
    benefits(refs["t_l"], refs["a_l"], refs["t_s"], refs["a_s"], refs["t_l"], refs["a_l"], refs["min_gap"])
    refs["token_gap_floored"] = bool(floor_gaps and abs(refs["t_l"] - refs["t_s"]) < 1.0)
    refs["acc_gap_floored"] = bool(floor_gaps and abs(refs["a_l"] - refs["a_s"]) < 1.0 / n_dev)
    return refs


# --------------------------------------------------------------------------- SFT on the mixture (TRL)

WeightSource = MixtureSchedule | Sequence[float]


def _fixed_weights(weights: Sequence[float]) -> tuple[float, float]:
    """Validated fixed mixture weights (two non-negative numbers summing to 1)."""
    w = np.asarray(weights, dtype=float)
    if w.shape != (2,) or not np.isfinite(w).all() or (w < 0).any() or not math.isclose(w.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"weights must be two non-negative numbers summing to 1, got {weights!r}")
    return float(w[SHORT]), float(w[LONG])


def current_weights(source: WeightSource) -> tuple[float, float]:
    """The weights a batch is drawn with now: the schedule's current ones, or fixed ones."""
    return tuple(source.weights) if isinstance(source, MixtureSchedule) else _fixed_weights(source)


class MixtureBatchSampler(torch.utils.data.Sampler):
    """Batches of row indices whose pools are drawn, batch by batch, from the current mixture weights.

    Within a pool, rows come in a shuffled order that is reshuffled each time the pool is used up (an epoch
    per pool). `log` records every batch drawn: its weights and how many rows came from each pool.
    """

    def __init__(self, pool_labels: Sequence[int], batch_size: int, num_batches: int, weights: WeightSource,
                 seed: int = 0) -> None:
        labels = np.asarray(pool_labels)
        if labels.ndim != 1 or not np.isin(labels, [SHORT, LONG]).all():
            raise ValueError(f"pool_labels must be a sequence of {SHORT} (short) and {LONG} (long)")
        if int(batch_size) != batch_size or batch_size < 1 or int(num_batches) != num_batches or num_batches < 0:
            raise ValueError(f"batch_size must be >= 1 and num_batches >= 0, got {batch_size!r}, {num_batches!r}")
        self.rows = [np.flatnonzero(labels == SHORT), np.flatnonzero(labels == LONG)]
        self.source = weights
        w = current_weights(weights)
        for p in (SHORT, LONG):
            # a schedule can raise any weight above 0, so both pools must have rows; fixed weights need rows where > 0
            if not len(self.rows[p]) and (isinstance(weights, MixtureSchedule) or w[p] > 0):
                raise ValueError(f"the {POOLS[p]} pool has no rows but can be drawn (weight {w[p]:g})")
        self.batch_size, self.num_batches = int(batch_size), int(num_batches)
        self._rng = np.random.default_rng(seed)
        self._order: list[np.ndarray] = [np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)]
        self._pos = [0, 0]
        self.log: list[dict] = []

    def __len__(self) -> int:
        return self.num_batches

    def _next_row(self, pool: int) -> int:
        """The pool's next row, reshuffling the pool when it is used up."""
        if self._pos[pool] >= len(self._order[pool]):
            self._order[pool] = self._rng.permutation(self.rows[pool])
            self._pos[pool] = 0
        self._pos[pool] += 1
        return int(self._order[pool][self._pos[pool] - 1])

    def __iter__(self):
        for _ in range(self.num_batches):
            w = current_weights(self.source)  # read now: the callback may have re-weighted after the last step
            pools = draw_pools(w, self.batch_size, self._rng)
            batch = [self._next_row(int(p)) for p in pools]
            n_long = int(pools.sum())
            self.log.append({"batch": len(self.log), "w_short": w[SHORT], "w_long": w[LONG],
                             "n_short": self.batch_size - n_long, "n_long": n_long})
            yield batch


class ReweightCallback(TrainerCallback):
    """Every eval_every optimizer steps (and after the last): evaluate the dev set, feed the schedule, keep the best.

    `evaluate(model)` returns a dict with dev_tokens and dev_acc. With a schedule, each evaluation goes to
    MixtureSchedule.observe (which re-weights only on its update steps), and the weights of the checkpoint
    that choose_checkpoint currently picks are kept in memory (on the CPU), so only one copy is ever held.
    """

    def __init__(self, evaluate: Callable[[Any], Mapping], eval_every: int, weights: WeightSource,
                 acc_floor: float = 0.7, keep_best: bool = True, progress: bool = False) -> None:
        if int(eval_every) != eval_every or eval_every < 1:
            raise ValueError(f"eval_every must be a positive integer, got {eval_every!r}")
        self.evaluate, self.eval_every, self.source = evaluate, int(eval_every), weights
        self.acc_floor = _finite("acc_floor", acc_floor, 0.0, 1.0)
        self.keep_best, self.progress = keep_best, progress
        self.records: list[dict] = []
        self.best_state: dict | None = None
        self.best_step: int | None = None

    @property
    def schedule(self) -> MixtureSchedule | None:
        """The schedule fed with the dev numbers (None for fixed weights)."""
        return self.source if isinstance(self.source, MixtureSchedule) else None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.eval_every and step != state.max_steps:
            return control
        dev = self.evaluate(model)
        rec = {"step": int(step), "dev_tokens": float(dev["dev_tokens"]), "dev_acc": float(dev["dev_acc"])}
        if self.schedule is not None:
            self.schedule.observe(step, rec["dev_tokens"], rec["dev_acc"])
            h = self.schedule.history[-1]
            rec.update(b_short=h["b_short"], b_long=h["b_long"], updated=h["updated"])
        w = current_weights(self.source)
        rec.update(w_short=w[SHORT], w_long=w[LONG])
        self.records.append(rec)
        if self.keep_best and self.schedule is not None:
            choice = choose_checkpoint(self.records, self.schedule.a_l, self.acc_floor)
            if choice is not None and choice["step"] == step:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                self.best_step = int(step)
        if self.progress:
            tqdm.write(f"  step {step}: dev tokens {rec['dev_tokens']:.1f}, dev acc {rec['dev_acc']:.3f}, "
                       f"w_short {rec['w_short']:.3f}" + (" (re-weighted)" if rec.get("updated") else ""))
        return control


class MixtureSFTTrainer(SFTTrainer):
    """SFTTrainer whose training batches come from a MixtureBatchSampler over the dataset's `pool` column."""

    def __init__(self, *args, weights: WeightSource, sampler_seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.accelerator.num_processes > 1:
            raise ValueError("mixture training runs on one process: every rank would draw the same batches")
        if self.args.gradient_accumulation_steps != 1 or self.args.max_steps < 1:
            raise ValueError("mixture training needs gradient_accumulation_steps=1 and max_steps >= 1 "
                             "(one drawn batch per optimizer step)")
        # the pools are read from the prepared dataset: TRL may drop or reorder rows while preparing it
        labels = np.asarray(self.train_dataset["pool"])
        self.mixture_sampler = MixtureBatchSampler(labels, self.args.per_device_train_batch_size, self.args.max_steps,
                                                   weights, seed=sampler_seed)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """A plain DataLoader over the mixture sampler (not accelerate's, which reads one batch ahead)."""
        dataset = self._remove_unused_columns(self.train_dataset, description="training")
        return torch.utils.data.DataLoader(dataset, batch_sampler=self.mixture_sampler, collate_fn=self.data_collator,
                                           num_workers=0)


def mixture_dataset(pools: pd.DataFrame, tokenizer):
    """The prompt-completion dataset TRL tokenizes (its completions get EOS), with pool = 0 (short) / 1 (long)."""
    _check_columns(pools, ("pool", "prompt", "completion"), "pools table")
    if pools.empty:
        raise ValueError("the pools table is empty: there is nothing to train on")
    bad = sorted(set(pools["pool"]) - set(POOLS))
    if bad:
        raise ValueError(f"pool must be one of {list(POOLS)}, got {bad}")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: TRL appends it to every completion")
    prompts = pools["prompt"].tolist()
    if _special_tokens_added(tokenizer)[0]:
        # as in dpo_l: the chat-formatted prompt already holds the BOS text that TRL's encoding would add again
        bos = tokenizer.bos_token
        prompts = [p[len(bos):] if p.startswith(bos) else p for p in prompts]
    return datasets.Dataset.from_dict({"prompt": prompts, "completion": pools["completion"].tolist(),
                              "pool": [POOLS.index(p) for p in pools["pool"]]})


@dataclass
class MixtureRun:
    """One SFT run on the mixture: dev evaluations, batch composition, losses, the chosen checkpoint, the model."""

    name: str
    records: pd.DataFrame  # one row per dev evaluation: step, dev_tokens, dev_acc, weights (and benefits)
    batches: pd.DataFrame  # one row per optimizer step: the weights its batch was drawn with, rows per pool
    log: pd.DataFrame  # one row per logged step: loss, learning rate, ...
    chosen: dict | None  # choose_checkpoint's record (None: none passed the floor, or fixed weights)
    model: Any  # the trained model, holding the chosen checkpoint's weights when there is one
    wall_time_s: float = 0.0


@dataclass(frozen=True)
class MixtureJob:
    """One SFT run on the mixture: name, weights (fixed, or a schedule), dev period, scratch folder, seed, device."""

    weights: WeightSource
    eval_every: int
    output_dir: str | Path
    seed: int
    name: str = "tldr"
    device: str = "cpu"  # "cpu" or "cuda"
    progress: bool = True


def _sft_settings(cfg, job: MixtureJob, training: TrainingConfig) -> dict[str, Any]:
    """SFTConfig's arguments: the TLDRConfig's lr, steps and batch; the TrainingConfig's length, bf16, checkpointing."""
    return dict(
        output_dir=str(job.output_dir), learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
        max_length=training.max_length, completion_only_loss=True, packing=False, bf16=training.bf16,
        seed=job.seed, data_seed=job.seed,
        # set explicitly: TRL's SFTConfig turns activation (gradient) checkpointing on by default (the keyword is
        # activation_checkpointing on newer transformers, gradient_checkpointing on older ones)
        **compat.checkpointing_kwargs(training.gradient_checkpointing, SFTConfig),
        # about 50 loss rows per run: enough for a curve, short enough for a notebook's progress table
        report_to="none", save_strategy="no", logging_strategy="steps", logging_steps=max(1, cfg.max_steps // 50),
        disable_tqdm=not job.progress, dataloader_num_workers=0, dataloader_pin_memory=False,
        use_cpu=job.device == "cpu",
    )


def train_mixture(model, tokenizer, pools: pd.DataFrame, cfg, evaluate: Callable[[Any], Mapping], job: MixtureJob,
                  training: TrainingConfig | None = None) -> MixtureRun:
    """SFT (TRL) for cfg.max_steps steps on batches drawn from the pools with the job's weights or schedule.

    cfg is a TLDRConfig (lr, constant as in the paper; batch_size; max_steps; acc_floor); training (a TrainingConfig,
    default its defaults) gives max_length, bf16 and gradient checkpointing. The dev set is evaluated every
    job.eval_every steps and after the last; with a schedule, the chosen checkpoint's weights are loaded into the
    model before it is returned.
    """
    if job.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {job.device!r}")
    started = time.perf_counter()
    callback = ReweightCallback(evaluate, job.eval_every, job.weights, acc_floor=cfg.acc_floor, progress=job.progress)
    settings = _sft_settings(cfg, job, training or TrainingConfig())
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # TRL's five dataset-preparation bars per run say nothing here
    try:
        trainer = MixtureSFTTrainer(model=model, args=SFTConfig(**settings), processing_class=tokenizer,
                                    train_dataset=mixture_dataset(pools, tokenizer), callbacks=[callback],
                                    weights=job.weights, sampler_seed=job.seed)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    trainer.train()
    shutil.rmtree(job.output_dir, ignore_errors=True)  # nothing is saved there (save_strategy="no") but TRL's scratch
    records = pd.DataFrame(callback.records)
    chosen = None
    if callback.schedule is not None:
        chosen = choose_checkpoint(callback.records, callback.schedule.a_l, cfg.acc_floor)
        if chosen is not None:
            if chosen["step"] != callback.best_step:  # the running argmin must agree with the rule over all records
                raise RuntimeError(f"kept checkpoint {callback.best_step} but the rule picks {chosen['step']}")
            trainer.model.load_state_dict(callback.best_state)
    batches = pd.DataFrame(trainer.mixture_sampler.log)
    batches.insert(0, "step", batches["batch"] + 1)  # batch b is the one optimizer step b + 1 trains on
    log = pd.DataFrame([r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r])
    return MixtureRun(name=job.name, records=records, batches=batches.drop(columns="batch"), log=log, chosen=chosen,
                      model=trainer.model, wall_time_s=time.perf_counter() - started)


def save_model(model, tokenizer, path: str | Path) -> Path:
    """Save a model (safetensors) and its tokenizer into a folder, atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return path


# --------------------------------------------------------------------------- comparison


def compression_table(table: pd.DataFrame, base: str = "base") -> pd.DataFrame:
    """Per model: accuracy, Len-T and Len-A averaged over benchmarks, and A.C.R. of Len-A against the base's."""
    _check_columns(table, ("acc", "len_t", "len_a"), "metrics table")
    if list(table.index.names) != ["model", "benchmark"]:
        raise ValueError(f"metrics table must be indexed by (model, benchmark), got {list(table.index.names)}")
    models = table.index.get_level_values("model").unique()
    if base not in models:
        raise ValueError(f"no {base!r} rows in the metrics table (models: {list(models)})")
    orig = table.loc[base, "len_a"].to_dict()
    rows = {}
    for m in models:
        t = table.loc[m]
        rows[m] = {"acc": float(t["acc"].mean()), "len_t": float(t["len_t"].mean()), "len_a": float(t["len_a"].mean()),
                   "acr": acr(t["len_a"].to_dict(), orig)}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "model"
    return out
