"""Tables that satisfy an artifact's schema (core/pipeline.SCHEMAS), for tests of the stage bookkeeping."""

from __future__ import annotations

import pandas as pd

from tsq_utils.core import pipeline

_VALUES = {"str": lambda c, i: f"{c}{i}", "int": lambda c, i: i, "float": lambda c, i: 0.5 + i,
           "bool": lambda c, i: i % 2 == 0}


def fake_table(stage: str, file: str, n: int = 1, **extra) -> pd.DataFrame:
    """n rows with every column the schema of (stage, file) declares, of its kind, plus the `extra` columns (each a
    list of n values, or one value for every row)."""
    columns = pipeline.schema(stage, file) or {}
    data = {c: [_VALUES[k](c, i) for i in range(n)] for c, k in columns.items()}
    for c, v in extra.items():
        data[c] = list(v) if isinstance(v, (list, range, tuple)) else [v] * n
    return pd.DataFrame(data, index=range(n))
