"""What every figure module shares: the token note, the correct/wrong colours, twin grouping, KL flattening."""

from __future__ import annotations

import math

import numpy as np

TOKENS_NOTE = "tokens = completion tokens (thinking + answer)"
CORRECT, WRONG = "#009E73", "#CC79A7"


def _finite(values) -> np.ndarray:
    """Flatten nested lists of KL values (None or NaN where not scored) to a float array of the finite ones."""
    out = []
    for v in values if values is not None else []:
        if isinstance(v, (list, tuple, np.ndarray)):
            out.extend(_finite(v).tolist())
        elif v is not None:
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(f):
                out.append(f)
    return np.asarray(out, dtype=float)


def _same_groups(labels: list[str], keys: list[tuple]) -> list[tuple[list[int], str]]:
    """Indices grouped by identical result keys (twins: one trained model), with a joined label."""
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out = []
    for idx in groups.values():
        lab = " = ".join(labels[i] for i in idx)
        out.append((idx, lab + (" (same model)" if len(idx) > 1 else "")))
    return out
