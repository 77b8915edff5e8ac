"""The first thing to run on a GPU machine: do the paper profile's own code paths work here, and what do they cost?

    python scripts/first_gpu_check.py [--profile r1-1.5b] [--model DIR] [--data-dir ../shared/data]
    python scripts/first_gpu_check.py --cpu-smoke       # the same steps at toy size on the CPU (CI runs it)

It runs what the profile runs, with the profile's settings (sized for about 10 minutes on one H100):
  install      versions, GPUs, the NVIDIA driver and torch's CUDA build (CUDA 13.0 builds need driver >= 580).
  tokenizer    the model's tokenizer round-trips real R1-Distill traces (../shared/data) exactly, and its chat
               template opens <think>; tokens per step.
  sampling     the profile's engine (vLLM, its engine arguments and tensor-parallel check) and sampling settings
               (temperature, top-p, max_tokens = the profile's sampling.max_new_tokens) on 20 MATH500 problems,
               graded with math-verify: accuracy, finish reasons, tokens/s, the engine's GPU memory.
  refinement   one real R1 trace (cut at a step boundary to --refine-tokens) refined with the profile's modes
               (refinement.candidates / scoring / steps: branch / fast / spans, K, L, epsilon): s per step, peak
               GPU memory.
  training     4 DPO-L + SFT steps (notebook 04's trainer, the profile's training settings) on pairs whose rejected
               response is a real R1 trace of the profile's max_length (9,000 tokens): peak GPU memory, s per step.
               Skipped where the profile trains in more processes than there are GPUs (r1-7b: 8).
  train-2proc  with >= 2 GPUs: `accelerate launch` of the training entry (tsq_utils.method.train_entry) in 2
               processes under DeepSpeed ZeRO-3, max_steps unset (the reference log-probs are precomputed).
  sample-2dp   with >= 2 GPUs: sampling.data_parallel_size 2: two vLLM engines in their own processes
               (model/vllm_shards.py), the requests sharded over them.
Each check prints one line: PASS / FAIL / SKIP, its name, its figures. The exit status is 1 when any check failed.

--cpu-smoke runs every check at toy size on the CPU, on the r1-1.5b profile with the R1 stand-in model
(tsq_utils.model.standin: a tiny Llama with a byte-level tokenizer and R1's template) in place of the hub model: the
transformers backend instead of vLLM, 2 gloo processes for train-2proc, and for sample-2dp two transformers-backed
engines through vllm_shards (the same process, pipe and sharding code as the vLLM engines).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# --------------------------------------------------------------------------- a transformers-backed engine


class TransformersEngine:
    """vllm.LLM's generate() over a transformers model (the --cpu-smoke sample-2dp check): one request per prompt,
    its own seed, answers as vLLM's RequestOutputs (outputs[j].text / index / finish_reason)."""

    def __init__(self, model: str, tokenizer: str | None = None, **_ignored):
        import torch

        from tsq_utils.model.base_model import load_tokenizer
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.tok = load_tokenizer(tokenizer or model, "hub")
        self.model = AutoModelForCausalLM.from_pretrained(model, use_safetensors=True).eval()

    def generate(self, inputs, params):
        from tsq_utils.model.generation import Decoding, sample

        outs = []
        for inp, p in zip(inputs, params):
            p = p if isinstance(p, dict) else vars(p)
            prompt = self.tok.decode(inp["prompt_token_ids"])
            spec = Decoding(n=p["n"], temperature=p["temperature"], top_p=p["top_p"], max_new_tokens=p["max_tokens"],
                            seed=p["seed"])
            res = sample(self.model, self.tok, [prompt], spec, backend="transformers")
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=t, index=j, finish_reason=r) for j, (t, r) in
                                                 enumerate(zip(res.texts[0], res.finish_reasons[0]))]))
        return outs


# --------------------------------------------------------------------------- helpers


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _peak_reset() -> None:
    import torch

    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> str:
    import torch

    return f"peak GPU memory {_gib(torch.cuda.max_memory_allocated())}" if _cuda() else "no GPU memory (CPU)"


def _gpu_used() -> str:
    import torch

    if not _cuda():
        return "CPU"
    free, total = torch.cuda.mem_get_info()
    return f"GPU memory in use {_gib(total - free)} of {_gib(total)}"


def r1_traces(ctx: dict) -> list[dict]:
    """Real R1-Distill AIME25 traces (../shared/data) of the profile's model size: {problem, completion}."""
    size = "7B" if "7B" in ctx["profile"].model.path else "1.5B"
    path = Path(ctx["data_dir"]) / f"aime25_DeepSeek-R1-Distill-Qwen-{size}_aime_25_rollout_temperature0.6.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --data-dir must hold the R1 traces (see ../shared/data)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"problem": r["instruction"], "completion": r["completion"]} for r in rows if r.get("completion")]


def cut_at_step(tok, text: str, n_tokens: int) -> str:
    """The longest head of text that ends at a step boundary (a blank line) within n_tokens tokens."""
    parts, out = text.split("\n\n"), ""
    for part in parts:
        nxt = out + ("\n\n" if out else "") + part
        if len(tok(nxt, add_special_tokens=False)["input_ids"]) > n_tokens:
            break
        out = nxt
    return out or text[: n_tokens]


def long_text(tok, traces: list[dict], n_tokens: int) -> str:
    """R1 text of about n_tokens tokens (traces joined where one is too short)."""
    text = ""
    for t in sorted(traces, key=lambda r: -len(r["completion"])):
        text += ("\n\n" if text else "") + t["completion"]
        if len(tok(text, add_special_tokens=False)["input_ids"]) >= n_tokens:
            break
    return cut_at_step(tok, text, n_tokens)


# --------------------------------------------------------------------------- the checks


def check_install(ctx: dict) -> str:
    from importlib import metadata

    import torch

    from tsq_utils.core.config import MIN_NVIDIA_DRIVER, no_gpu_message, nvidia_driver_version

    versions = []
    for pkg in ("torch", "transformers", "trl", "accelerate", "deepspeed", "vllm"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{pkg} -")
    driver = nvidia_driver_version() or "none"
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())] if _cuda() else []
    for i, p in enumerate(gpus):
        print(f"  GPU {i}: {p.name}, {_gib(p.total_memory)}")
    print("  " + ", ".join(versions))
    if not ctx["cpu"] and not gpus:
        raise RuntimeError(no_gpu_message("the first-GPU check"))
    major = driver.split(".")[0]
    if gpus and torch.version.cuda and torch.version.cuda.startswith("13") and major.isdigit() \
            and int(major) < MIN_NVIDIA_DRIVER:
        raise RuntimeError(f"driver {driver} < {MIN_NVIDIA_DRIVER} for a CUDA {torch.version.cuda} build")
    ctx["n_gpus"] = len(gpus)
    return (f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}), NVIDIA driver {driver}, "
            f"{len(gpus)} GPU(s)" + (f" {gpus[0].name}" if gpus else ""))


def check_tokenizer(ctx: dict) -> str:
    from tsq_utils.model import base_model
    from tsq_utils.task import data
    from tsq_utils.task.format import THINK_OPEN

    tok = ctx["tok"] = base_model.load_tokenizer(ctx["model"], "hub")
    traces = ctx["traces"] = r1_traces(ctx)
    n_tok, n_steps, bad = 0, 0, []
    for i, t in enumerate(traces):
        text = t["completion"] if not ctx["cpu"] else t["completion"][:4000]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if tok.decode(ids) != text:
            bad.append(i)
        n_tok += len(ids)
        n_steps += text.count("\n\n") + 1
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(traces)} R1 traces do not round-trip (first: trace {bad[0]})")
    prompt = data.r1_prompt(traces[0]["problem"], tok)
    if not prompt.endswith(THINK_OPEN + "\n") or prompt.count(THINK_OPEN) != 1:
        raise RuntimeError(f"the chat template does not open one {THINK_OPEN}: ...{prompt[-60:]!r}")
    merged = len(tok(".\n\n", add_special_tokens=False)["input_ids"]) == 1
    return (f"{len(traces)} R1 traces ({n_tok:,} tokens) round-trip exactly, {n_tok / n_steps:.1f} tokens per step, "
            f"template opens {THINK_OPEN}; '.\\n\\n' is {'one token' if merged else 'several tokens'}")


def check_sampling(ctx: dict) -> str:
    from tsq_utils.core.config import load_profile
    from tsq_utils.method import sampling
    from tsq_utils.model.generation import Decoding
    from tsq_utils.task.registry import get_task
    from tsq_utils.model import base_model
    from tsq_utils.task import data

    prof, tok = ctx["profile"], ctx["tok"]
    s = prof.sampling
    max_new = ctx["max_new_tokens"] or s.max_new_tokens
    if max_new != s.max_new_tokens:
        prof = load_profile(prof.name, {**ctx["overrides"], "sampling.max_new_tokens": max_new})
    local = data.local_path_for("math500", {}, ctx["data_dir"])
    problems = data.load_benchmark("math500", local_path=local, limit=ctx["n_problems"])
    problems = problems.assign(prompt=[data.r1_prompt(p, tok) for p in problems["problem"]])
    t0 = time.perf_counter()
    engine, _ = base_model.load_sampler(ctx["model"], "hub", prof)
    start = time.perf_counter() - t0
    memory = _gpu_used()
    try:
        t0 = time.perf_counter()
        spec = Decoding(n=ctx["n_samples"], temperature=s.temperature, top_p=s.top_p, max_new_tokens=max_new, seed=0,
                        batch_size=s.batch_size)
        samples = sampling.sample_and_grade(engine, tok, problems, get_task("math500"), spec,
                                            sampling.SampleRun(backend=s.backend, progress=False))
        dt = time.perf_counter() - t0
    finally:
        base_model.release_sampler(engine)
        del engine
        gc.collect()
    ctx["samples"] = samples
    tokens = int(samples["n_tokens"].sum())
    reasons = samples["finish_reason"].value_counts().to_dict()
    return (f"{s.backend}, {len(problems)} MATH500 x {ctx['n_samples']} at T={s.temperature} top-p {s.top_p}, "
            f"max_tokens {max_new}: accuracy {samples['correct'].mean():.3f}, mean {samples['n_tokens'].mean():,.0f} "
            f"tokens, finish {reasons}, {tokens / dt:,.0f} tokens/s, engine start {start:.0f} s, {memory}")


def _transformers_model(ctx: dict, dtype: str | None = None):
    from tsq_utils.model import base_model

    return base_model.load_model(ctx["model"], "hub", ctx["profile"], dtype=dtype)[0]


def check_refinement(ctx: dict) -> str:
    from tsq_utils.method import refinement
    from tsq_utils.task import data

    prof, tok = ctx["profile"], ctx["tok"]
    r = prof.refinement
    trace = max(ctx["traces"], key=lambda t: len(t["completion"]))
    text = cut_at_step(tok, trace["completion"], ctx["refine_tokens"])
    prompt = data.r1_prompt(trace["problem"], tok)
    model = _transformers_model(ctx)
    _peak_reset()
    t0 = time.perf_counter()
    cfg = dataclasses.replace(r, n_candidates=ctx["k"] or r.n_candidates, window=ctx["window"] or r.window)
    res = refinement.refine_response(model, tok, refinement.Response(prompt, text), cfg, seed=0)
    dt = time.perf_counter() - t0
    peak = _peak()
    del model
    n_steps = max(1, len(res.steps))
    return (f"candidates {r.candidates}, scoring {r.scoring}, steps {r.steps}, K {ctx['k'] or r.n_candidates}, "
            f"L {ctx['window'] or r.window}: {res.n_tokens_original} -> {res.n_tokens} tokens, {res.n_accepted} of "
            f"{len(res.steps)} steps rewritten, {dt / n_steps:.2f} s per step ({dt:.0f} s), {peak}")


def _pairs(ctx: dict, n: int):
    """n pairs: a sampled response (the shortest correct, else the shortest) as chosen, and a real R1 trace of
    about the profile's max_length tokens as rejected (the long end of training)."""
    import pandas as pd

    tok, samples = ctx["tok"], ctx["samples"]
    rejected = long_text(tok, ctx["traces"], ctx["train_tokens"])
    rows = []
    for _, g in samples.groupby("problem_id", sort=False):
        g = g.sort_values(["correct", "n_tokens"], ascending=[False, True])
        rows.append({"prompt": g["prompt"].iloc[0], "chosen": g["text"].iloc[0], "rejected": rejected})
    while len(rows) < n:
        rows.append(dict(rows[len(rows) % max(1, len(rows))]))
    return pd.DataFrame(rows[:n])


def check_training(ctx: dict) -> str:
    import dataclasses

    from tsq_utils.method import dpo_l

    prof = ctx["profile"]
    n_proc = dpo_l.num_processes(prof.training)
    if n_proc > 1 and not ctx["cpu"] and ctx["n_gpus"] < n_proc:
        return (f"SKIP the profile trains in {n_proc} processes ({prof.training.accelerate_config}); train-2proc "
                "checks that path")
    cfg = dataclasses.replace(prof.training, batch_size=1, grad_accum=1, max_length=ctx["train_tokens"],
                              num_processes=1)
    pairs = _pairs(ctx, 4)
    model = _transformers_model(ctx, "float32" if cfg.bf16 else None)  # notebook 04: fp32 master weights
    _peak_reset()
    t0 = time.perf_counter()
    run = dpo_l.TrainRun(seed=0, device="cuda" if _cuda() else "cpu", max_steps=4, progress=False)
    log = dpo_l.train_and_save(model, ctx["tok"], pairs, cfg, ctx["out"] / "train-1", run)
    dt = time.perf_counter() - t0
    peak = _peak()
    del model
    losses = ", ".join(f"{v:.3f}" for v in log["loss"])
    if len(log) != 4 or not all(v == v for v in log["loss"]):
        raise RuntimeError(f"expected 4 finite losses, got {losses}")
    return f"4 steps at max_length {cfg.max_length}: {dt / 4:.1f} s per step, losses {losses}, {peak}"


def check_train_2proc(ctx: dict) -> str:
    import dataclasses

    from tsq_utils.method import dpo_l

    if not ctx["cpu"] and ctx["n_gpus"] < 2:
        return "SKIP needs 2 GPUs"
    prof = ctx["profile"]
    # 8 pairs, global batch 1 x 2 x 2 = 4: two optimizer steps, max_steps unset (the r1 profiles' setting, which
    # precomputes the reference log-probs)
    cfg = dataclasses.replace(prof.training, batch_size=1, grad_accum=2, max_length=ctx["train_tokens"],
                              accelerate_config="zero3", num_processes=2)
    pairs = _pairs(ctx, 8)
    _peak_reset()
    model = _transformers_model(ctx)
    device = "cpu" if ctx["cpu"] else "cuda"
    t0 = time.perf_counter()
    log = dpo_l.train_and_save(model, ctx["tok"], pairs, cfg, ctx["out"] / "train-2",
                               dpo_l.TrainRun(seed=0, device=device, progress=False))
    dt = time.perf_counter() - t0
    del model
    saved = ctx["out"] / "train-2" / "model"
    if not any(saved.glob("*.safetensors")):
        raise RuntimeError(f"no model saved under {saved}")
    how = "2 gloo processes (DDP)" if ctx["cpu"] else "2 GPUs, DeepSpeed ZeRO-3"
    return (f"accelerate launch of train_entry on {how}, max_steps unset: {len(log)} steps in {dt:.0f} s, losses "
            + ", ".join(f"{v:.3f}" for v in log["loss"]) + ", model saved")


def check_sample_2dp(ctx: dict) -> str:
    from tsq_utils.core.config import load_profile
    from tsq_utils.model import base_model, generation
    from tsq_utils.model.vllm_shards import ShardedEngines

    if not ctx["cpu"] and ctx["n_gpus"] < 2:
        return "SKIP needs 2 GPUs"
    tok, prof = ctx["tok"], ctx["profile"]
    prompts = list(dict.fromkeys(ctx["samples"]["prompt"]))[:8]
    s = prof.sampling
    max_new = min(ctx["max_new_tokens"] or s.max_new_tokens, 4096)
    _peak_reset()  # the engines need the memory the earlier checks' models held
    t0 = time.perf_counter()
    if ctx["cpu"]:
        engines = ShardedEngines({"model": ctx["model"]}, 2, factory="first_gpu_check:TransformersEngine",
                                 devices=["cpu0", "cpu1"])
    else:
        p2 = load_profile(prof.name, {**ctx["overrides"], "sampling.data_parallel_size": 2,
                                      "sampling.max_new_tokens": max_new})
        engines = base_model.make_vllm_engine(ctx["model"], p2)
    start = time.perf_counter() - t0
    pids = engines.pids
    try:
        if len(engines) != 2 or len(set(map(tuple, engines.devices))) != 2:
            raise RuntimeError(f"expected 2 engines on their own devices, got {engines.devices}")
        spec = generation.Decoding(n=2, temperature=s.temperature, top_p=s.top_p, max_new_tokens=max_new, seed=0)
        inputs, params = generation.vllm_requests(tok, prompts, spec)
        if not ctx["cpu"]:
            from vllm import SamplingParams

            params = [SamplingParams(**kw) for kw in params]
        t0 = time.perf_counter()
        outs = engines.generate(inputs, params)
        dt = time.perf_counter() - t0
    finally:
        base_model.release_sampler(engines)
    if not all(_gone(pid) for pid in pids):
        raise RuntimeError("engine processes outlived the shutdown")
    texts = [c.text for o in outs for c in o.outputs]
    if len(outs) != len(prompts) or len(texts) != 2 * len(prompts):
        raise RuntimeError(f"{len(outs)} answers for {len(prompts)} requests")
    if ctx["cpu"]:  # the sharded answers are those of one engine (each request carries its own seed)
        one = TransformersEngine(ctx["model"]).generate(inputs, params)
        if [c.text for o in one for c in o.outputs] != texts:
            raise RuntimeError("the 2 engines' answers differ from one engine's")
    n_tok = sum(generation.count_tokens(tok, t) for t in texts)
    return (f"2 engines ({', '.join(map(str, engines.devices))}) started in {start:.0f} s, {len(prompts)} prompts x 2: "
            f"{n_tok:,} tokens, {n_tok / dt:,.0f} tokens/s, both engines shut down"
            + (", same answers as one engine" if ctx["cpu"] else ""))


def _gone(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


CHECKS = (("install", check_install), ("tokenizer", check_tokenizer), ("sampling", check_sampling),
          ("refinement", check_refinement), ("training", check_training), ("train-2proc", check_train_2proc),
          ("sample-2dp", check_sample_2dp))
NEEDS = {"tokenizer": "install", "sampling": "tokenizer", "refinement": "tokenizer", "training": "sampling",
         "train-2proc": "sampling", "sample-2dp": "sampling"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="every check at toy size on the CPU (R1 stand-in)")
    ap.add_argument("--profile", default="r1-1.5b", help="the profile whose settings are checked")
    ap.add_argument("--model", default="", help="a local model folder (default: the profile's hub model)")
    data_dirs = [d for d in (REPO.parent / "shared" / "data", REPO / "shared" / "data") if d.is_dir()]
    ap.add_argument("--data-dir", default=str(data_dirs[0] if data_dirs else REPO.parent / "shared" / "data"),
                    help="math500_test.jsonl and the R1 AIME25 traces")
    ap.add_argument("--n-problems", type=int, default=20)
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0: the profile's sampling.max_new_tokens")
    ap.add_argument("--refine-tokens", type=int, default=2000, help="tokens of the R1 trace refined")
    ap.add_argument("--train-tokens", type=int, default=0, help="0: the profile's training.max_length")
    ap.add_argument("--only", default="", help="comma-separated checks (with the ones they need)")
    ap.add_argument("--out", default="/tmp/tsq-first-gpu")
    a = ap.parse_args(argv)
    import torch

    from tsq_utils.core.config import load_profile

    overrides: dict = {}
    k = window = 0
    if a.cpu_smoke:
        from tsq_utils.model.standin import build_standin

        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        a.model = str(build_standin(Path(a.out) / "standin-r1"))
        overrides = {"sampling.backend": "transformers", "model.local_override": a.model}
        os.environ["TSQ_ALLOW_CPU"] = "1"  # the GPU profile on the CPU, as asked
        a.n_problems, a.n_samples = min(a.n_problems, 6), 2
        a.max_new_tokens, a.refine_tokens, a.train_tokens = a.max_new_tokens or 48, 1000, a.train_tokens or 160
        k, window = 4, 32
    prof = load_profile(a.profile, overrides)
    ctx = {"cpu": a.cpu_smoke, "profile": prof, "overrides": overrides, "model": a.model or prof.model.path,
           "data_dir": a.data_dir, "n_problems": a.n_problems, "n_samples": a.n_samples,
           "max_new_tokens": a.max_new_tokens, "refine_tokens": a.refine_tokens,
           "train_tokens": a.train_tokens or prof.training.max_length, "k": k, "window": window,
           "out": Path(a.out), "n_gpus": 0}
    ctx["out"].mkdir(parents=True, exist_ok=True)
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    wanted = set(only)
    for name in list(only):
        while name in NEEDS:
            name = NEEDS[name]
            wanted.add(name)
    results, passed, t_start = [], set(), time.perf_counter()
    print(f"first-GPU check: profile {prof.name}, model {ctx['model']}" + (" (CPU smoke)" if a.cpu_smoke else ""),
          flush=True)
    for name, fn in CHECKS:
        if wanted and name not in wanted:
            continue
        t0 = time.perf_counter()
        if NEEDS.get(name) and NEEDS[name] not in passed:
            line = f"SKIP {name}: needs {NEEDS[name]}"
        else:
            print(f"\n== {name}", flush=True)
            try:
                msg = fn(ctx)
                if msg.startswith("SKIP "):
                    line = f"SKIP {name}: {msg[5:]}"
                else:
                    line = f"PASS {name} ({time.perf_counter() - t0:.0f} s): {msg}"
                passed.add(name)
            except Exception as e:  # noqa: BLE001 - every check reports; the ones that need it are skipped
                traceback.print_exc()
                line = f"FAIL {name} ({time.perf_counter() - t0:.0f} s): {type(e).__name__}: {str(e)[:600]}"
        results.append(line)
        print(line, flush=True)
    print(f"\n== summary ({time.perf_counter() - t_start:.0f} s)")
    for line in results:
        print(line)
    return 1 if any(line.startswith("FAIL") for line in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
