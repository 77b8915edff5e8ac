"""Issue 26: a content-addressed ablation cache that cannot lie (copies, verified hashes) and its list/verify/prune."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import tsq_utils.ablations as A
from tsq_utils.ablations import cache
from tsq_utils.core.artifacts import atomic_write_json, load_table, path_hash, save_table
from tsq_utils.core.config import stage_seed
from tsq_utils.core.fingerprint import package_hash

from test_ablations import Fakes, make_ctx
from tsq_utils.core.config import load_profile

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def prof():
    return load_profile("ci")


@pytest.fixture
def ctx(tmp_path, prof):
    return make_ctx(tmp_path / "runs" / "ci", prof)


def _row(ctx, name="table3/kl"):
    return next(r for r in A.build_rows(ctx.profile) if r.name == name)


def test_a_tampered_entry_is_found_said_and_recomputed(monkeypatch, ctx, capsys):
    """Issue 26: results.parquet rewritten as valid Parquet moved a row from 25% to 100%, exit 0."""
    f = Fakes(monkeypatch)
    rec = A.run_row(ctx, _row(ctx))
    entry = ctx.cache_dir / rec["keys"]["results"]
    meta = json.loads((entry / cache.CACHE_META).read_text())
    assert set(meta["files"]) == {"results.parquet"} and cache.verify_entry(entry) == []
    good = load_table(entry / "results.parquet")
    save_table(good.assign(correct=True), entry / "results.parquet")  # valid Parquet, other numbers
    assert cache.verify(ctx.cache_dir) == {rec["keys"]["results"]: [
        "results.parquet changed (sha256 differs from meta.json)"]}
    n_eval = len(f.eval)
    capsys.readouterr()
    again = A.run_row(ctx, _row(ctx))
    out = capsys.readouterr().out
    assert f"cache entry {rec['keys']['results']} does not verify (results.parquet changed" in out
    assert "recomputing it" in out and len(f.eval) == n_eval + 1
    pd.testing.assert_frame_equal(load_table(entry / "results.parquet"), good)
    assert again["keys"] == rec["keys"] and cache.verify(ctx.cache_dir) == {}
    assert json.loads((entry / cache.CACHE_META).read_text())["note"].startswith("recomputed: the cached entry")


def test_an_entry_with_a_missing_or_added_file_or_no_hashes_does_not_verify(monkeypatch, ctx):
    Fakes(monkeypatch)
    rec = A.run_row(ctx, _row(ctx))
    model = ctx.cache_dir / rec["keys"]["model"]
    (model / "model" / "weights.txt").unlink()
    (model / "extra.bin").write_bytes(b"x")
    assert cache.verify_entry(model) == ["model/weights.txt is missing", "extra.bin is not part of the entry"]
    pairs = ctx.cache_dir / rec["keys"]["pairs"]
    meta = json.loads((pairs / cache.CACHE_META).read_text())
    del meta["files"]
    atomic_write_json(pairs / cache.CACHE_META, meta)
    assert cache.verify_entry(pairs) == ["meta.json records no file hashes (written by an older version)"]
    bad = cache.verify(ctx.cache_dir, remove=True)
    assert set(bad) == {rec["keys"]["model"], rec["keys"]["pairs"]} and not model.exists() and not pairs.exists()


def _selection_outputs(ctx, prof):
    """Notebook 02's tables for the fake run, written to its selection folder: (folder, pairs, their hashes)."""
    from tsq_utils.method import selection

    pairs, stats = selection.select_pairs(ctx.samples, seed=stage_seed(prof.seed, "selection"))
    d = ctx.run_dir / "selection"
    d.mkdir(parents=True)
    save_table(pairs, d / "pairs.parquet")
    save_table(stats, d / "problem_stats.parquet")
    return d, pairs, {n: path_hash(d / n) for n in ("pairs.parquet", "problem_stats.parquet")}


def _selection_manifest(ctx, prof, d, hashes) -> None:
    """A complete selection manifest over the given output hashes, as notebook 02 writes it."""
    atomic_write_json(d / "manifest.json", {
        "stage": "selection", "complete": True, "code": {"package": package_hash()}, "profile_config": prof.to_dict(),
        "seed": stage_seed(prof.seed, "selection"), "inputs": {"samples": {"sha256": ctx.samples_sha}},
        "output_hashes": hashes})


def test_adopted_files_are_copies_so_a_cp_over_the_stage_leaves_the_cache_alone(monkeypatch, ctx, prof):
    """Issue 26: the cache hard-linked 04's model, so `cp` over training/model/model.safetensors rewrote two entries."""
    Fakes(monkeypatch)
    d, _, hashes = _selection_outputs(ctx, prof)
    _selection_manifest(ctx, prof, d, hashes)
    rec = A.run_row(ctx, _row(ctx, "table2/q_dyn"))
    assert rec["sources"]["pairs"] == "adopted from notebooks/02_selection.ipynb"
    entry = ctx.cache_dir / rec["keys"]["pairs"]
    assert os.stat(entry / "pairs.parquet").st_ino != os.stat(d / "pairs.parquet").st_ino  # not a hard link
    cached = (entry / "pairs.parquet").read_bytes()
    with open(d / "pairs.parquet", "r+b") as fh:  # as `cp other pairs.parquet`: the same inode, rewritten
        fh.write(b"\0" * 16)
    assert (entry / "pairs.parquet").read_bytes() == cached and cache.verify_entry(entry) == []


def test_a_stage_output_rewritten_after_its_manifest_is_not_adopted(monkeypatch, ctx, prof):
    Fakes(monkeypatch)
    d, pairs, hashes = _selection_outputs(ctx, prof)
    save_table(pairs.iloc[:1], d / "pairs.parquet")  # rewritten, then the manifest (mtime alone cannot tell)
    _selection_manifest(ctx, prof, d, hashes)
    rec = A.run_row(ctx, _row(ctx, "table2/q_dyn"))
    assert rec["sources"]["pairs"] == "computed"


def test_prune_by_code_age_and_size(monkeypatch, ctx):
    Fakes(monkeypatch)
    A.run_row(ctx, _row(ctx))
    es = cache.entries(ctx.cache_dir)
    assert len(es) == 5 and all(e["current_code"] for e in es)
    old = es[0]["path"] / cache.CACHE_META
    meta = json.loads(old.read_text())
    atomic_write_json(old, {**meta, "code": "other", "finished_at": "2020-01-01T00:00:00+00:00"})
    assert [e["key"] for e in cache.prune(ctx.cache_dir, stale_code=True, dry_run=True)] == [es[0]["key"]]
    assert [e["key"] for e in cache.prune(ctx.cache_dir, older_than_days=30)] == [es[0]["key"]]
    assert len(cache.entries(ctx.cache_dir)) == 4
    gone = cache.prune(ctx.cache_dir, max_bytes=0)
    assert len(gone) == 4 and cache.entries(ctx.cache_dir) == []


def test_the_cache_command_lists_verifies_and_prunes(monkeypatch, ctx):
    Fakes(monkeypatch)
    rec = A.run_row(ctx, _row(ctx))
    save_table(pd.DataFrame({"x": [1]}), ctx.cache_dir / rec["keys"]["results"] / "results.parquet")

    def cmd(*args):
        return subprocess.run([sys.executable, "-m", "tsq_utils.ablations.cache", *args, "--cache",
                               str(ctx.cache_dir)], capture_output=True, text=True, cwd=REPO, timeout=120)

    r = cmd("list")
    assert r.returncode == 0 and "5 entries" in r.stdout and "today code" in r.stdout
    r = cmd("verify")
    assert r.returncode == 1 and f"{rec['keys']['results']}: results.parquet changed" in r.stdout
    assert "4 of 5 entries verify" in r.stdout
    r = cmd("verify", "--remove")
    assert r.returncode == 0 and "(removed)" in r.stdout
    r = cmd("prune")
    assert r.returncode == 2 and "prune needs" in r.stderr
    r = cmd("prune", "--max-size", "0")
    assert r.returncode == 0 and "4 entries removed" in r.stdout


def test_an_entry_whose_hashes_were_patched_is_refused_by_its_columns(monkeypatch, ctx):
    Fakes(monkeypatch)
    rec = A.run_row(ctx, _row(ctx))
    entry = ctx.cache_dir / rec["keys"]["results"]
    res = load_table(entry / "results.parquet")
    save_table(res.assign(correct=res["correct"].map({True: "yes", False: "no"})), entry / "results.parquet")
    meta = json.loads((entry / cache.CACHE_META).read_text())
    atomic_write_json(entry / cache.CACHE_META, {**meta, "files": cache.entry_files(entry)})  # hashes patched
    problems = cache.verify_entry(entry)
    assert len(problems) == 1 and problems[0].startswith("results.parquet: column 'correct' holds")


def test_cache_keys_cover_the_code_the_rows_run_and_nothing_else(tmp_path, monkeypatch):
    """Issue 26: a comment anywhere re-keyed every entry (41 -> 77 entries); now only a code edit the rows run does."""
    import shutil

    from tsq_utils.core import fingerprint

    pkg = Path(shutil.copytree(fingerprint.PACKAGE_DIR, tmp_path / "tsq_utils",
                               ignore=shutil.ignore_patterns("__pycache__")))
    monkeypatch.setattr(fingerprint, "PACKAGE_DIR", pkg)

    def key() -> str:
        fingerprint._CODE_OF.clear()
        return fingerprint.code_of("tsq_utils.ablations")

    before = key()
    for rel in ("method/refinement/refine.py", "lessons/plotting.py", "core/stage.py"):
        (pkg / rel).write_text("# a comment\n" + (pkg / rel).read_text())
    (pkg / "method" / "tldr.py").write_text((pkg / "method" / "tldr.py").read_text() + "\n_EDITED = 1\n")
    (pkg / "lessons" / "plotting.py").write_text((pkg / "lessons" / "plotting.py").read_text() + "\n_EDITED = 1\n")
    assert key() == before  # comments anywhere; code the rows never run
    ref = pkg / "method" / "refinement" / "refine.py"
    ref.write_text(ref.read_text() + "\n_EDITED = 1\n")
    assert key() != before
    fingerprint._CODE_OF.clear()
