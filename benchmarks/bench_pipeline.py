"""Where a run's time goes, and what a second core buys: per-notebook wall times and the 1 vs 2 workers speed-up.

    python benchmarks/bench_pipeline.py times [--profile toy]        # the stages' wall times of runs/<profile>/
    python benchmarks/bench_pipeline.py workers [--problems 84 --n 24] # notebook 01's sampling with 1 and 2 workers

`times` reads each stage's manifest (wall_time_s: from the stage's setup to its finish, recorded by the stage; a
stage reused from an earlier run keeps that run's time). run_all.sh's own per-notebook lines add the kernel's start.

`workers` samples the toy profile's training problems (the shipped reasoner, the profile's sampling settings) once
with workers = 1 and once with workers = 2, over the profile's fixed shards, checks the two tables are identical
and prints tokens/s and the speed-up. Run it with nothing else heavy on the box: it measures cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGES = ["pretrain", "sampling", "selection", "refinement", "training", "evaluation", "ablations", "tldr"]


def times(profile: str, runs: Path) -> int:
    """Print one line per stage of runs/<profile>/: its manifest's wall time and when it finished."""
    run = runs / profile
    if not run.is_dir():
        print(f"no run folder {run}: run ./run_all.sh --profile {profile} first", file=sys.stderr)
        return 2
    total = 0.0
    print("| stage | notebook wall time (s) | finished at |\n|---|---:|---|")
    for name in STAGES:
        m = run / name / "manifest.json"
        if not m.is_file():
            print(f"| {name} | not run | |")
            continue
        d = json.loads(m.read_text())
        w = d.get("wall_time_s")
        total += w or 0.0
        print(f"| {name} | {w if w is not None else float('nan'):,.1f} | {d.get('finished_at', '?')} |")
    print(f"| **total** | **{total:,.1f}** ({total / 60:.1f} min) | |")
    return 0


def workers(profile: str, n_problems: int, n: int | None) -> int:
    """Sample the same problems with 1 and 2 workers; print tokens/s, the speed-up and whether the bytes agree."""
    from tsq_utils.core.config import load_profile, set_threads
    from dataclasses import replace

    from tsq_utils.method.sampling import SampleRun, sample_and_grade, sampling_decoding, training_problems
    from tsq_utils.task.registry import training_task
    from tsq_utils.model.toy_reasoner import load_reasoner

    P = load_profile(profile)
    set_threads(1)
    model, tok = load_reasoner(REPO / P.model.path)
    S = P.sampling
    problems = training_problems(P, tok).head(n_problems)
    n = n or S.n
    out, secs = {}, {}
    for w in (1, 2):
        t0 = time.perf_counter()
        out[w] = sample_and_grade(model, tok, problems, training_task(P), replace(sampling_decoding(P, 1), n=n),
                                  SampleRun(shards=P.shards, workers=w, progress=False))
        secs[w] = time.perf_counter() - t0
    same = out[1].equals(out[2])
    tokens = int(out[1]["n_tokens"].sum())
    print(f"workload: {len(problems)} problems x {n} samples at T {S.temperature}, {P.shards} shards, "
          f"{tokens:,} completion tokens")
    print("| workers | seconds | tokens/s |\n|---:|---:|---:|")
    for w in (1, 2):
        print(f"| {w} | {secs[w]:.1f} | {tokens / secs[w]:,.0f} |")
    print(f"speed-up 2 vs 1 workers: {secs[1] / secs[2]:.2f}x; identical tables: {same}")
    if not same:
        diff = (out[1] != out[2]).any(axis=1).sum()
        print(f"  {diff} rows differ", file=sys.stderr)
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("times", help="per-stage wall times of a run folder")
    t.add_argument("--profile", default="toy")
    t.add_argument("--runs", type=Path, default=REPO / "runs")
    w = sub.add_parser("workers", help="notebook 01's sampling with 1 and 2 workers")
    w.add_argument("--profile", default="toy")
    w.add_argument("--problems", type=int, default=84)
    w.add_argument("--n", type=int, default=None, help="samples per problem (default: the profile's sampling.n)")
    a = ap.parse_args(argv)
    if a.cmd == "times":
        return times(a.profile, a.runs)
    return workers(a.profile, a.problems, a.n)


if __name__ == "__main__":
    sys.exit(main())
