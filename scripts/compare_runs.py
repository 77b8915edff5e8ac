"""Compare two run folders' results: every table (.parquet), metric (.json, manifests aside) and rendered table (.md).

    python scripts/compare_runs.py runs/toy /tmp/toy_before     # exit 0 when every result is identical

Used to show that a change that should not move results (a refactor) did not: manifests differ by design (code
fingerprints, times), so they are left out; everything else must match value for value.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

SKIP_DIRS = {"notebooks", "cache", "reference_cache", "checkpoints", "model"}
SKIP_NAMES = {"manifest.json"}
# Wall-clock fields differ run to run by nature, and code fingerprints and the cache keys made from them differ
# whenever the code changes (a refactor included): every other value must match.
NOT_RESULTS = ("wall_time", "seconds", "fingerprint")


def is_result(name: str) -> bool:
    """Whether a column or key holds a result (not a wall-clock measure, code fingerprint or cache key)."""
    name = str(name)
    return not (any(t in name for t in NOT_RESULTS) or name.endswith("_key"))


def results_only(value, root: str):
    """A JSON value with its non-result keys dropped at every depth and the run folder's path written <run>."""
    if isinstance(value, dict):
        return {k: results_only(v, root) for k, v in value.items() if is_result(k)}
    if isinstance(value, list):
        return [results_only(v, root) for v in value]
    return value.replace(root, "<run>") if isinstance(value, str) else value


def result_files(root: Path) -> set[str]:
    """The result files of a run folder, relative to it: tables, metrics and rendered tables."""
    out = set()
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        # below a stage's folder, a saved model (model/, static_mix_model/, ...) is weights and configs, not results
        inner = set(rel.parts[1:-1])
        if not p.is_file() or SKIP_DIRS & inner or any(d.endswith("_model") for d in inner) or p.name in SKIP_NAMES:
            continue
        if p.suffix in {".parquet", ".json", ".md", ".jsonl"}:
            out.add(str(rel))
    return out


def same(a: Path, b: Path, roots: tuple[Path, Path]) -> bool:
    """Whether two result files hold the same values (parquet by content, JSON by value, the rest byte for byte)."""
    if a.suffix == ".parquet":
        x, y = (pd.read_parquet(f) for f in (a, b))
        x, y = (d.drop(columns=[c for c in d.columns if not is_result(c)]) for d in (x, y))
        return x.shape == y.shape and list(x.columns) == list(y.columns) and x.equals(y)
    if a.suffix == ".json":
        ra, rb = (str(r.resolve()) for r in roots)
        return results_only(json.loads(a.read_text()), ra) == results_only(json.loads(b.read_text()), rb)
    return a.read_bytes() == b.read_bytes()


def main() -> int:
    """Print each result file that differs or exists on one side only; exit 1 when any does."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("new", type=Path)
    ap.add_argument("old", type=Path)
    args = ap.parse_args()
    new, old = result_files(args.new), result_files(args.old)
    bad = [f"only in {args.new}: {f}" for f in sorted(new - old)]
    bad += [f"only in {args.old}: {f}" for f in sorted(old - new)]
    both = sorted(new & old)
    bad += [f"differs: {f}" for f in both if not same(args.new / f, args.old / f, (args.new, args.old))]
    print("\n".join(bad) if bad else f"identical: {len(both)} result files")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
