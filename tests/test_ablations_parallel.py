"""Issue 22: notebook 06's independent rows side by side (ablations.run_rows through core/parallel.map_shards).

The expensive stages are the stand-ins of test_ablations.py (deterministic functions of their inputs), so the test
checks the runner's part: every entry computed once, by one worker, with the same bytes whatever `workers` is."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

import tsq_utils.ablations as A
from tsq_utils.ablations import cache

from test_ablations import Fakes, make_ctx
from tsq_utils.core.config import load_profile

@pytest.fixture
def prof():
    return load_profile("ci")


ROWS = ["table2/shortest", "table2/q_dyn", "table3/kl", "table3/no_kl", "table4/sft"]


def _run(tmp_path: Path, prof, monkeypatch, workers: int, name: str):
    f = Fakes(monkeypatch)
    pids = tmp_path / f"pids-{name}.txt"
    train = f.train_and_save

    def train_and_log_pid(*a, **kw):
        with open(pids, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return train(*a, **kw)

    from tsq_utils.method import dpo_l

    monkeypatch.setattr(dpo_l, "train_and_save", train_and_log_pid)
    ctx = make_ctx(tmp_path / name / "runs" / "ci", prof)
    rows = [r for r in A.build_rows(prof) if r.name in ROWS and r.seed == 0] + [
        A.make_row(prof, "base", "b", refine="off", objective="none")]
    table = A.run_rows(ctx, rows, progress=False, workers=workers)
    entries = {}
    for d in sorted(ctx.cache_dir.iterdir()):
        if d.is_dir() and d.name != cache.TWINS:
            assert cache.verify_entry(d) == [], d.name
            meta = json.loads((d / cache.CACHE_META).read_text())
            entries[d.name] = (meta["files"], meta["payload"], meta["source"])
    twins = {t.name: t.read_text() for t in (ctx.cache_dir / cache.TWINS).iterdir()}
    trained_in = set(pids.read_text().split()) if pids.exists() else set()
    return table, entries, twins, trained_in, ctx


def test_rows_side_by_side_write_what_one_worker_writes(tmp_path, prof, monkeypatch):
    one, entries1, twins1, pids1, ctx1 = _run(tmp_path, prof, monkeypatch, 1, "one")
    two, entries2, twins2, pids2, ctx2 = _run(tmp_path, prof, monkeypatch, 2, "two")
    pd.testing.assert_frame_equal(one, two)
    assert entries1 == entries2 and twins1 == twins2
    assert pids1 == {str(os.getpid())}  # one worker: in this process
    if torch.get_num_threads() == 1:  # (map_shards forks only from a one-thread parent)
        assert str(os.getpid()) not in pids2 and len(pids2) >= 1  # two workers: in forked processes
    # and a second pass recomputes nothing, whatever the workers
    again = A.run_rows(ctx2, [r for r in A.build_rows(prof) if r.name in ROWS and r.seed == 0], progress=False,
                       workers=2)
    assert set(again[["pairs", "model", "results"]].stack()) == {"cached"}
    # force recomputes every entry once, the same way with one worker or two
    rows = [r for r in A.build_rows(prof) if r.name in ROWS and r.seed == 0]
    forced1 = A.run_rows(ctx1, rows, force=True, progress=False, workers=1)
    forced2 = A.run_rows(ctx2, rows, force=True, progress=False, workers=2)
    pd.testing.assert_frame_equal(forced1, forced2)
    assert set(forced2["model"]) == {"computed"}  # each row's own model, trained again (rows sharing pairs: once)


def test_a_failing_row_in_a_worker_is_reported_and_the_others_finish(tmp_path, prof, monkeypatch):
    Fakes(monkeypatch, fail_train=True)
    ctx = make_ctx(tmp_path / "runs" / "ci", prof)
    rows = [r for r in A.build_rows(prof) if r.name in ("table2/shortest", "table2/q_dyn") and r.seed == 0]
    with pytest.raises(RuntimeError, match=r"2 of 2 ablation rows failed:\n  table2/shortest \(seed 0\): "
                                           r"RuntimeError: training blew up"):
        A.run_rows(ctx, rows, progress=False, workers=2)
    assert all(cache.verify_entry(ctx.cache_dir / A.row_keys(ctx, r)["pairs"]) == [] for r in rows)
