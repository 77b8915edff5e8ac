"""TLDR dynamic re-weighting (arXiv 2506.02678), the pure logic: benefits, weight update, checkpoint rule, pool draws.

Weights are (w_short, w_long): the System-1 (short CoT) and System-2 (long CoT) pools. Accuracies are
fractions in [0, 1]. The training loop (notebook 07) evaluates the dev set, feeds the numbers to
MixtureSchedule.observe and draws each batch's pools from MixtureSchedule.draw.

Choices:
- Coinciding reference points (T_L = T_S or A_L = A_S) make the benefits undefined: a ValueError by
  default; pass min_gap > 0 to floor the denominators instead (tiny CI runs, where they can tie).
- choose_checkpoint keeps the paper's strict inequality (dev_acc > acc_floor * A_L, compared after
  rounding to 9 decimals, so 0.56 is not above 0.7 * 0.8); ties in dev
  tokens go to the higher dev accuracy, then the earlier step. None when no checkpoint qualifies:
  the caller must then say so (and, e.g., fall back to the original model), not pick silently.
- The static 1:1 mix is the same schedule with update_every = math.inf: weights never change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

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


def benefits(t_cur: float, a_cur: float, t_s: float, a_s: float, t_l: float, a_l: float,
             min_gap: float | None = None) -> tuple[float, float]:
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
        gap = _finite("min_gap", min_gap)
        if gap <= 0:
            raise ValueError(f"min_gap must be positive, got {min_gap!r}")
        dt, da = max(dt, gap), max(da, gap)
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
    min_gap: float | None = None
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
                    static: bool = False, min_gap: float | None = None) -> MixtureSchedule:
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
