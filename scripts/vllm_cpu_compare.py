"""Run notebooks 00, 01 and 05 on the toy profile with each sampling backend and compare them (see vllm_cpu_compare.sh).

The toy profile is copied with device: auto (a vllm profile must not say cpu) and sampling.max_model_len: 1024 (the
toy reasoner's context); seeds and sizes are the toy's. vllm-cpu 0.32's engine dies on a request that carries a seed
("CPU Generator does not use offset"), so generation.sample sends its requests unseeded there (the engine's seed).
Notebook 05 compares the base reasoner with itself (trained_model = the shipped reasoner), so no training runs: the
point is the backends, not the method.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("00_base_model", "01_sampling", "05_evaluation")


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    cdf_a, cdf_b = np.searchsorted(a, grid, "right") / len(a), np.searchsorted(b, grid, "right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def write_profile(folder: Path) -> Path:
    """The toy profile, runnable under both backends on a CPU."""
    raw = yaml.safe_load((REPO / "profiles" / "toy.yaml").read_text())
    raw["device"] = "auto"  # resolves to cpu here; "cpu" would refuse the vllm backend
    raw.setdefault("sampling", {})["max_model_len"] = 1024  # the toy reasoner's max_position_embeddings
    path = folder / "toy.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_backend(backend: str, profile: Path, out: Path, kernel: str, n_problems: int | None,
                reuse: bool = False) -> dict:
    """Execute the notebooks with papermill under one backend; return cell timings and the run folder."""
    import os

    import papermill as pm

    runs = out / f"runs-{backend}"
    os.environ["TSQ_RUNS_DIR"] = str(runs)
    os.environ["TSQ_FIGURES_DIR"] = str(out / f"figures-{backend}")
    os.environ["TSQ_PROFILE"] = str(profile)
    timings = {}
    executed_all = [out / f"{nb}-{backend}.ipynb" for nb in NOTEBOOKS]
    if reuse and all(p.is_file() for p in executed_all) and (runs / "toy" / "evaluation" / "results.parquet").is_file():
        import nbformat

        for nb, path in zip(NOTEBOOKS, executed_all):
            executed = nbformat.read(str(path), as_version=4)
            cells = [(c["source"], c["metadata"].get("papermill", {}).get("duration") or 0.0)
                     for c in executed["cells"] if c["cell_type"] == "code"]
            timings[nb] = {"wall_s": sum(d for _, d in cells), "cells": cells}
        print(f"  {backend:12s} reusing the executed notebooks in {out}", flush=True)
        return {"runs": runs / "toy", "timings": timings}
    for nb in NOTEBOOKS:
        params = {"profile": str(profile)}
        if nb != "00_base_model":
            params["backend"] = backend
        if nb == "01_sampling" and n_problems:
            params["n_problems"] = n_problems
        if nb == "05_evaluation":
            params["trained_model"] = str(REPO / "checkpoints" / "toy-reasoner")
            if n_problems:
                params["n_problems"] = n_problems
        t0 = time.perf_counter()
        executed = pm.execute_notebook(str(REPO / "notebooks" / f"{nb}.ipynb"), str(out / f"{nb}-{backend}.ipynb"),
                                       parameters=params, kernel_name=kernel, cwd=str(REPO / "notebooks"),
                                       progress_bar=False, log_output=False)
        cells = [(c["source"], c["metadata"].get("papermill", {}).get("duration") or 0.0)
                 for c in executed["cells"] if c["cell_type"] == "code"]
        timings[nb] = {"wall_s": time.perf_counter() - t0, "cells": cells}
        print(f"  {backend:12s} {nb}: {timings[nb]['wall_s']:.0f} s", flush=True)
    return {"runs": runs / "toy", "timings": timings}


def _cell_seconds(cells, needle: str) -> float:
    """Duration of the first cell whose source contains needle."""
    return next(d for src, d in cells if needle in src)


def summarize(backend: str, res: dict) -> dict:
    """Accuracy, length distribution and tokens/s of one backend's run."""
    run = res["runs"]
    samples = pd.read_parquet(run / "sampling" / "samples.parquet")
    results = pd.read_parquet(run / "evaluation" / "results.parquet")
    base = results[results["model"] == "base"]
    t01 = res["timings"]["01_sampling"]["cells"]
    t05 = res["timings"]["05_evaluation"]["cells"]
    sample_s = _cell_seconds(t01, "sampling.sample_and_grade(model, tok, problems")
    load_s = _cell_seconds(t01, "load_base_sampler")
    eval_s = _cell_seconds(t05, "evaluation.evaluate_model")
    eval_tokens = results.loc[results["model"].isin(["base", "tokensqueeze"]), "n_tokens"].sum()
    return {
        "backend": backend,
        "01 responses": len(samples), "01 accuracy": samples["correct"].mean(),
        "01 mean tokens": samples["n_tokens"].mean(), "01 median tokens": samples["n_tokens"].median(),
        "01 p90 tokens": samples["n_tokens"].quantile(0.9),
        "01 cut at max tokens": (samples["finish_reason"] == "length").mean(),
        "05 responses (base)": len(base), "05 accuracy (base)": base["correct"].mean(),
        "05 mean tokens (base)": base["n_tokens"].mean(),
        "model load / engine start s": load_s,
        "01 sampling s": sample_s, "01 tokens/s": samples["n_tokens"].sum() / sample_s,
        "05 evaluation s (2 models, incl. engine starts)": eval_s, "05 tokens/s": eval_tokens / eval_s,
        "_lengths01": samples["n_tokens"].to_numpy(), "_lengths05": base["n_tokens"].to_numpy(),
        "_acc_by_k": samples.groupby("k")["correct"].mean(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default="tsq-vllm-cpu")
    ap.add_argument("--n-problems", type=int, default=None, help="problems per notebook (default: the toy's 420)")
    ap.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    ap.add_argument("--reuse", action="store_true", help="reuse a backend's executed notebooks already in --out")
    args = ap.parse_args()
    import torch
    import transformers
    import vllm

    out = Path(args.out or tempfile.mkdtemp(prefix="tsq-vllm-cpu-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"vllm {vllm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}; "
          f"output in {out}")
    profile = write_profile(out)
    rows = []
    for backend in ("transformers", "vllm"):
        rows.append(summarize(backend, run_backend(backend, profile, out, args.kernel, args.n_problems, args.reuse)))
    table = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]).set_index("backend").T
    pd.set_option("display.width", 160)
    print("\n" + table.to_string(float_format=lambda v: f"{v:,.3f}"))
    t, v = rows
    print("\nlength distributions, KS statistic transformers vs vllm: "
          f"01 {ks_statistic(t['_lengths01'], v['_lengths01']):.3f}, "
          f"05 {ks_statistic(t['_lengths05'], v['_lengths05']):.3f}")
    by_k = pd.DataFrame({"transformers": t["_acc_by_k"], "vllm": v["_acc_by_k"]})
    print("\n01 accuracy by difficulty k:\n" + by_k.round(3).to_string())
    plain = {r["backend"]: {k: float(x) if isinstance(x, (int, float, np.number)) else x
                           for k, x in r.items() if not k.startswith("_")} for r in rows}
    (out / "comparison.json").write_text(json.dumps(plain, indent=1))


if __name__ == "__main__":
    main()
