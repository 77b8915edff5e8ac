"""Time refinement: the old path (every step's prefix recomputed) vs the new one (one forward pass per response).

    python benchmarks/bench_refinement.py                  # part "paths" on both workloads (10-20 min, 1 thread)
    python benchmarks/bench_refinement.py --workload toy   # the toy reasoner only (a few minutes)
    python benchmarks/bench_refinement.py --only kl --k 64 --window 512 --prefix 1024 --device cuda
    python benchmarks/bench_refinement.py --only pairs --responses 7 --sample-batch-size 64 256 --pairs-repeats 3

Part "paths" (the default): refine_pairs on the same responses along four paths, and for each the forward tokens
per refined step (prefill: prompts and prefixes run through the model; decode: one token per row per step of
candidate sampling; KL window: the rows of the windowed-KL passes, padding included), the candidates shorter than
their step that were decided per second of scoring time, the wall time and the accept decisions:
    old                candidates from the sampler (K rows per step, each re-encoding the prefix), every
                       shorter candidate scored over the full window with the original recomputed (scoring
                       "reference": the code before the new path)
    old cands + fast   the same candidates, scored from one forward pass over the response ("fast": length
                       groups shortest first, early rejection by partial KL sums): same decisions as "old"?
    new                candidates decoded from the response's own KV cache ("branch"), "fast" scoring
    new exact KLs      the same candidates, "full" scoring (every KL exact: what rethreshold needs): same
                       decisions as "new"?
Workload "toy": the shipped toy reasoner on toy teacher traces (the toy profile's K = 16, L = 512). Workload
"r1": the R1 stand-in (tsq_utils.model.standin, built into a temporary folder) on real R1-Distill-Qwen-1.5B AIME25
traces from ../shared/data, each cut at a step boundary to --r1-chars characters (the stand-in's 4,096 positions),
K = 64, L = 512. Forward tokens are counted by a hook on the model's decoder; wall times are on this machine.

Part "kl": scoring K candidate steps, batched (with and without the prefix KV cache) vs one at a time, on
random token ids (the timings do not depend on what the tokens say). Uses the shipped toy reasoner when
checkpoints/toy-reasoner exists (or --model PATH), else a small random Llama.

Part "pairs": refine_pairs on N toy-world teacher traces (k = 2..8 operands), with every step's candidates
drawn in one sampler call (--sample-batch-size rows per generate call) vs one response at a time with one
generate call of K rows per step (the cost structure of per-step sampling). It reports wall and CPU
(process) time, responses/s and the ratio on CPU time (wall time on a shared machine mostly measures the
other load), and the share of time spent sampling. Uses the toy reasoner and its tokenizer when present, else a
random model of the toy reasoner's size (config.PretrainConfig defaults) with a freshly trained toy
tokenizer; a random model rarely emits a step boundary, so every candidate runs to its token limit: a
worst case for sampling (a trained reasoner stops at the end of a step).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tsq_utils.method.refinement import kl_window  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command-line sizes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=16, help="candidates per step")
    ap.add_argument("--window", type=int, default=64, help="continuation tokens compared (L)")
    ap.add_argument("--prefix", type=int, default=128, help="prefix tokens (prompt + earlier steps)")
    ap.add_argument("--step", type=int, default=24, help="tokens of the original step")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per forward pass when batched")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per mode (the median is reported)")
    ap.add_argument("--model", default="", help="a saved causal LM folder (default: the shipped toy reasoner)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the random model")
    ap.add_argument("--layers", type=int, default=2, help="layers of the random model")
    ap.add_argument("--vocab", type=int, default=512, help="vocabulary of the random model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("paths", "kl", "pairs", "all"), default="paths", help="which part to run")
    ap.add_argument("--workload", choices=("toy", "r1", "both"), default="both", help="paths: which workload")
    ap.add_argument("--toy-responses", type=int, default=12, help="paths: toy responses refined")
    ap.add_argument("--toy-k", type=int, default=16, help="paths: candidates per step on the toy workload")
    ap.add_argument("--r1-responses", type=int, default=3, help="paths: R1 traces refined")
    ap.add_argument("--r1-chars", type=int, default=3800, help="paths: characters kept of each R1 trace")
    ap.add_argument("--r1-k", type=int, default=64, help="paths: candidates per step on the R1 workload")
    ap.add_argument("--r1-max-step-tokens", type=int, default=512, help="paths: sampling cap (the r1 profile's)")
    ap.add_argument("--paths", default=",".join(PATHS), help="paths: which paths to run (comma-separated; 'old' "
                    "always runs, as the baseline)")
    ap.add_argument("--responses", type=int, default=8, help="pairs: toy responses refined (N)")
    ap.add_argument("--sample-batch-size", type=int, nargs="+", default=[64, 256],
                    help="pairs: rows per generate call when batched (several values: one mode each)")
    ap.add_argument("--pairs-repeats", type=int, default=1, help="pairs: timed repeats per mode (median)")
    ap.add_argument("--score-batch-size", type=int, default=64, help="pairs: rows per KL forward pass")
    ap.add_argument("--pairs-window", type=int, default=512, help="pairs: continuation tokens compared (L)")
    ap.add_argument("--epsilon", type=float, default=0.005, help="pairs: KL threshold")
    return ap.parse_args()


def load_model(args: argparse.Namespace):
    """The toy reasoner (or --model) if present, else a random Llama; returns (model, description)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path = Path(args.model) if args.model else REPO / "checkpoints" / "toy-reasoner"
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        desc = f"{path.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)"
    else:
        if args.model:
            raise SystemExit(f"no safetensors model at {path}")
        torch.manual_seed(args.seed)
        heads = max(1, args.hidden // 16)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=max(1024, args.prefix + args.step + args.window + 8))
        model = LlamaForCausalLM(cfg)
        desc = f"random Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}"
    return model.to(args.device).eval(), desc


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """Median wall time of fn() over repeats (after one warm-up call) and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_kl(args: argparse.Namespace) -> None:
    """Time kl_window on one step's K random candidates: batched with/without the prefix cache vs one at a time."""
    model, desc = load_model(args)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    rand = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    prefix, orig, cont = rand(args.prefix), rand(args.step), rand(args.window)
    lengths = torch.randint(1, args.step + 1, (args.k,), generator=g).tolist()  # candidates differ in length
    cands = [rand(n) for n in lengths]

    modes = {
        "batched + prefix cache": lambda: kl_window(model, prefix, orig, cands, cont, batch_size=args.batch_size),
        "batched, no cache": lambda: kl_window(model, prefix, orig, cands, cont, batch_size=args.batch_size,
                                               use_prefix_cache=False),
        "one at a time": lambda: torch.cat([kl_window(model, prefix, orig, [c], cont, batch_size=1,
                                                      use_prefix_cache=False) for c in cands]),
    }
    print(f"model: {desc} on {args.device}, {torch.get_num_threads()} thread(s)")
    print(f"K={args.k} candidates of {min(lengths)}-{max(lengths)} tokens, original step {args.step}, "
          f"prefix {args.prefix}, window {args.window}, batch size {args.batch_size}, median of {args.repeats}")
    results = {}
    for name, fn in modes.items():
        with torch.no_grad():
            results[name] = timed(fn, args.repeats)
    base_t, base_kl = results["one at a time"]
    for name, (t, kl) in results.items():
        diff = (kl - base_kl).abs().max().item()
        print(f"  {name:24s} {t * 1e3:9.1f} ms  {args.k / t:10.1f} candidates/s  x{base_t / t:5.2f} vs one at a time"
              f"  (max |dKL| {diff:.1e})")
    batched_t = results["batched + prefix cache"][0]
    print(f"ratio batched/one-at-a-time throughput: {base_t / batched_t:.2f}")


def load_toy(args: argparse.Namespace):
    """The toy reasoner and its tokenizer (or --model), else a random toy-size model and a fresh toy tokenizer."""
    from tsq_utils.core.config import PretrainConfig, ToyWorldConfig
    from tsq_utils.model import toy_reasoner

    path = Path(args.model) if args.model else REPO / "checkpoints" / "toy-reasoner"
    if (path / "model.safetensors").exists():
        model, tok = toy_reasoner.load_reasoner(path, device=args.device)
        return model, tok, f"{path.name} ({toy_reasoner.count_parameters(model) / 1e6:.2f}M params)"
    if args.model:
        raise SystemExit(f"no safetensors model at {path}")
    pcfg = PretrainConfig()
    tok = toy_reasoner.train_tokenizer(ToyWorldConfig(), vocab_size=pcfg.vocab_size, n_docs=500, seed=args.seed)
    model = toy_reasoner.new_model(tok, pcfg, seed=args.seed).to(args.device).eval()
    return model, tok, (f"random toy-size Llama ({toy_reasoner.count_parameters(model) / 1e6:.2f}M params, hidden "
                        f"{pcfg.hidden_size}, {pcfg.num_layers} layers)")


def toy_pairs(tok, n: int, seed: int):
    """A pairs table with n distinct chosen responses: toy teacher traces with k = 2..8 operands."""
    import random

    import pandas as pd

    from tsq_utils.core.config import ToyWorldConfig
    from tsq_utils.task import toy

    cfg, rng = ToyWorldConfig(), random.Random(f"bench:{seed}")
    rows = []
    for i in range(n):
        p = toy.make_problem(rng, 2 + i % 7, cfg.max_value, f"bench-{i}")
        text = toy.teacher_trace(p, rng, cfg)
        rows.append(dict(problem_id=p.problem_id, prompt=toy.prompt_for(p.question, tok), chosen=text,
                         chosen_tokens=len(tok(text, add_special_tokens=False)["input_ids"]), chosen_sample_idx=0))
    return pd.DataFrame(rows)


class SampleTimer:
    """Wraps refinement.sources.sample to add up the wall and CPU time spent sampling and the rows drawn."""

    def __init__(self, fn):
        self.fn, self.wall, self.cpu, self.rows, self.calls = fn, 0.0, 0.0, 0, 0

    def __call__(self, *a, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.fn(*a, **kw)
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        self.rows += sum(len(t) for t in out.texts)
        self.calls += 1
        return out


def bench_pairs(args: argparse.Namespace) -> None:
    """Time refine_pairs on N toy responses: all steps sampled together vs one response (and step) at a time."""
    import tsq_utils.method.refinement as refinement
    from tsq_utils.core.config import RefinementConfig
    from tsq_utils.method.refinement import RefineOptions, count_steps, refine_pairs

    model, tok, desc = load_toy(args)
    pairs = toy_pairs(tok, args.responses, args.seed)
    cfg = RefinementConfig(n_candidates=args.k, window=args.pairs_window, epsilon=args.epsilon,
                           batch_size=args.score_batch_size)
    n_steps = int(pairs["chosen"].map(count_steps).sum())
    print(f"\nrefine_pairs: {desc} on {args.device}, {torch.get_num_threads()} thread(s)")
    print(f"N={len(pairs)} responses, {n_steps} steps, K={args.k}, window {args.pairs_window}, "
          f"epsilon {args.epsilon}, KL batch {args.score_batch_size}; median of {args.pairs_repeats} "
          "(modes interleaved); CPU = process time, less sensitive than wall time to other load on the machine")

    def batched(bs: int):
        return lambda: [refine_pairs(model, tok, pairs, cfg, seed=args.seed, progress=False,
                                     options=RefineOptions(sample_batch_size=bs))]

    def one_at_a_time():
        # K rows per generate call: each call holds the candidates of one step, as per-step sampling did
        return [refine_pairs(model, tok, pairs.iloc[[i]], cfg, seed=args.seed, progress=False,
                             options=RefineOptions(sample_batch_size=args.k))
                for i in range(len(pairs))]

    modes = {f"one at a time ({args.k} rows/call)": one_at_a_time}
    modes.update({f"batched ({bs} rows/call)": batched(bs) for bs in args.sample_batch_size})
    real_sample = refinement.sources.sample
    stats: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in modes}
    info: dict[str, str] = {}
    try:
        with torch.no_grad():  # warm-up: first-call costs (kernels, stop-string tables) land in no mode
            refine_pairs(model, tok, pairs.iloc[:1], cfg, seed=args.seed, progress=False,
                         options=RefineOptions(sample_batch_size=args.k))
            for _ in range(args.pairs_repeats):
                for name, fn in modes.items():
                    timer = SampleTimer(real_sample)
                    refinement.sources.sample = timer
                    t0, c0 = time.perf_counter(), time.process_time()
                    outs = fn()
                    stats[name].append((time.perf_counter() - t0, time.process_time() - c0, timer.wall, timer.cpu))
                    log = [o[1] for o in outs]
                    accepted = sum(int(x["accepted"].sum()) for x in log)
                    sampled = sum(int((x["skipped"] == "").sum()) for x in log)
                    info[name] = f"{timer.rows} rows in {timer.calls} sample calls, {accepted}/{sampled} steps accepted"
    finally:
        refinement.sources.sample = real_sample
    med = {name: [statistics.median(x[i] for x in v) for i in range(4)] for name, v in stats.items()}
    base_name = next(iter(modes))
    base_cpu = med[base_name][1]
    for name, (wall, cpu, s_wall, s_cpu) in med.items():
        print(f"  {name:28s} wall {wall:6.2f} s  CPU {cpu:6.2f} s  {len(pairs) / cpu:6.2f} responses/s (CPU)  "
              f"sampling CPU {s_cpu:6.2f} s, scoring+rest CPU {cpu - s_cpu:5.2f} s  x{base_cpu / cpu:4.2f}  "
              f"({info[name]})")
    print("ratio batched/one-at-a-time throughput (CPU time): "
          + ", ".join(f"{name.split('(')[1][:-1]}: {base_cpu / m[1]:.2f}"
                      for name, m in med.items() if name != base_name))


PATHS = {  # name: (candidates, scoring)
    "old": ("sampler", "reference"),
    "old cands + fast": ("sampler", "fast"),
    "new": ("branch", "fast"),
    "new exact KLs": ("branch", "full"),
}
SAME_AS = {"old cands + fast": "old", "new exact KLs": "new"}  # decisions compared on the same candidates


class TokenCounter:
    """A forward pre-hook on the decoder: input tokens (padding included) per refinement phase."""

    def __init__(self, refinement):
        self.refinement = refinement
        self.counts: dict[str, int] = {}

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        phase = self.refinement._PHASE[0]
        if phase == "sample":  # the sampler's first pass over the prompts, then one token per row
            phase = "prefill" if ids.shape[1] > 1 else "decode"
        self.counts[phase] = self.counts.get(phase, 0) + int(ids.numel())


class Timed:
    """Wraps a function to add up its wall time."""

    def __init__(self, fn):
        self.fn, self.wall = fn, 0.0

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.wall += time.perf_counter() - t0


def r1_pairs(tok, n: int, n_chars: int):
    """n real R1-Distill-Qwen-1.5B AIME25 traces, each cut at the last blank line before n_chars characters and
    closed with '</think>' and an answer, as pairs rows with R1 prompts."""
    import json

    import pandas as pd

    from tsq_utils.task.data import r1_prompt

    path = REPO.parent / "shared" / "data" / "aime25_DeepSeek-R1-Distill-Qwen-1.5B_aime_25_rollout_temperature0.6.jsonl"
    if not path.exists():
        raise SystemExit(f"the R1 workload needs {path} (../shared/data)")
    rows = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        text = rec["completion"]
        if len(text) < n_chars:
            continue
        cut = text.rfind("\n\n", 0, n_chars)
        chosen = text[:cut].rstrip() + "\n</think>\n\nThe answer is $\\boxed{" + str(rec["answer"]) + "}$."
        rows.append(dict(problem_id=f"aime25-{rec['id']}", prompt=r1_prompt(rec["instruction"], tok), chosen=chosen,
                         chosen_tokens=len(tok(chosen, add_special_tokens=False)["input_ids"]), chosen_sample_idx=0))
        if len(rows) == n:
            break
    return pd.DataFrame(rows)


def run_paths(name: str, model, tok, pairs, cfg, seed: int, which: Sequence[str] = tuple(PATHS)) -> None:
    """refine_pairs along each path on the same pairs; print the table."""
    import tsq_utils.method.refinement as refinement
    from tsq_utils.method.refinement import refine_pairs

    counter = TokenCounter(refinement.scoring)
    handle = model.get_decoder().register_forward_pre_hook(counter, with_kwargs=True)
    real = {f: getattr(refinement.sources, f) for f in ("_draw_candidates", "_branch_candidates")}
    results = {}
    try:
        with torch.no_grad():
            refine_pairs(model, tok, pairs.iloc[:1], cfg, seed=seed, progress=False)  # warm-up
        for path, (cands, scoring) in PATHS.items():
            if path != "old" and path not in which:
                continue
            counter.counts = {}
            timers = {f: Timed(fn) for f, fn in real.items()}
            for f, t in timers.items():
                setattr(refinement.sources, f, t)
            t0, c0 = time.perf_counter(), time.process_time()
            path_cfg = dataclasses.replace(cfg, candidates=cands, scoring=scoring)
            out, log = refine_pairs(model, tok, pairs, path_cfg, seed=seed, progress=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            results[path] = dict(log=log, out=out, wall=wall, cpu=cpu, sample=sum(t.wall for t in timers.values()),
                                 counts=dict(counter.counts))
            print(f"  ... {path}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    finally:
        handle.remove()
        for f, fn in real.items():
            setattr(refinement.sources, f, fn)
    print(f"\n{name}: {len(pairs)} responses, K = {cfg.n_candidates}, L = {cfg.window}, epsilon = {cfg.epsilon}, "
          f"{torch.get_num_threads()} thread(s); forward tokens per refined step; sample/score/wall s are wall "
          "times (on a shared machine they include other load), CPU s the process time")
    head = (f"  {'path':16s} {'steps':>5s} {'prefill':>9s} {'decode':>8s} {'KL window':>10s} {'total':>9s} "
            f"{'x fewer':>7s} {'sample s':>8s} {'score s':>8s} {'wall s':>8s} {'x faster':>8s} {'CPU s':>7s} "
            f"{'x faster':>8s} {'cands/s':>8s} "
            f"{'accepted':>8s} {'same decisions':>14s}")
    print(head)
    base = results["old"]
    base_total = sum(base["counts"].values())
    for path, r in results.items():
        log = r["log"]
        steps = int((log["skipped"] == "").sum())
        c = r["counts"]
        total = sum(c.values())
        decided = sum(sum(1 for n in toks if n < o) for toks, o in zip(log["cand_tokens"], log["orig_tokens"]))
        score_s = r["wall"] - r["sample"]
        ref = SAME_AS.get(path) if SAME_AS.get(path) in results else None
        same = "-" if ref is None else str(
            log["accepted"].tolist() == results[ref]["log"]["accepted"].tolist()
            and log["new_tokens"].tolist() == results[ref]["log"]["new_tokens"].tolist()
            and r["out"]["chosen"].tolist() == results[ref]["out"]["chosen"].tolist())
        per = lambda k: c.get(k, 0) / max(steps, 1)  # noqa: E731
        print(f"  {path:16s} {steps:5d} {per('prefill'):9.0f} {per('decode'):8.0f} {per('kl_window'):10.0f} "
              f"{total / max(steps, 1):9.0f} {base_total / max(total, 1):7.1f} {r['sample']:8.1f} {score_s:8.1f} "
              f"{r['wall']:8.1f} {base['wall'] / r['wall']:8.1f} {r['cpu']:7.1f} {base['cpu'] / r['cpu']:8.1f} "
              f"{decided / max(score_s, 1e-9):8.0f} "
              f"{int(log['accepted'].sum()):8d} {same:>14s}")
    new_log = results["new"]["log"] if "new" in results else None
    kls = [] if new_log is None else [(v, b) for ks, bs in zip(new_log["kl"], new_log["kl_bound"])
                                      for v, b in zip(ks, bs)]
    n_exact = sum(1 for v, b in kls if v == v and not b)
    n_bound = sum(1 for v, b in kls if b)
    n_nan = sum(1 for v, b in kls if v != v)
    print(f"  new path's candidates: {n_exact} scored in full, {n_bound} rejected early (lower bounds), "
          f"{n_nan} not scored (not shorter, or a shorter length passed first)")
    extrapolate(results)


# Paper scale (README "Expected GPU memory and time per stage"): ~4.5 k chosen responses x ~55 steps, responses of
# ~4.5 k tokens (mean prefix ~2.4 k with the prompt), 35 tokens a step, K = 64, L = 512, about half the candidates
# shorter than their step and distinct (K' = 32). Throughputs on one H100 in bf16, the ones behind the README's
# estimate of the old path (1.5 s and 6 s a step): forward passes ~100 k (1.5B) and ~25 k (7B) tokens/s, batched
# vLLM decode ~20 k and ~6 k tokens/s. Assumptions, not measurements: only the fractions below are measured.
PAPER = dict(steps=4500 * 55, prefix=2400, response=4650, step=35, k=64, k_shorter=32, window=512)
THROUGHPUT = {"1.5B": (100_000, 20_000), "7B": (25_000, 6_000)}  # (forward, decode) tokens/s


def extrapolate(results: dict) -> None:
    """Paper-scale GPU time of each path, from this run's measured KL-window fraction (new rows / old rows)."""
    old = results["old"]
    steps = lambda r: max(int((r["log"]["skipped"] == "").sum()), 1)  # noqa: E731
    old_kl = old["counts"].get("kl_window", 0) / steps(old)
    p = PAPER
    decode = p["k"] * p["step"]  # the same candidates are decoded on every path
    old_kl_paper = (p["k_shorter"] + 1) * (p["step"] + p["window"])
    rows = {"old": (p["k"] * p["prefix"] + p["prefix"], old_kl_paper)}
    for name in ("new", "new exact KLs"):
        if name in results and old_kl > 0:
            frac = results[name]["counts"].get("kl_window", 0) / steps(results[name]) / old_kl
            # one forward pass per response, and the uncached tail of each vLLM request (about one step)
            rows[f"{name} (KL rows x{frac:.2f})"] = (p["response"] / 55 + p["step"], frac * old_kl_paper)
    print(f"  extrapolated to the paper's scale ({p['steps']:,} refined steps; assumptions in PAPER/THROUGHPUT):")
    for name, (prefill, kl) in rows.items():
        cells = []
        for model, (fwd, dec) in THROUGHPUT.items():
            per_step = (prefill + kl) / fwd + decode / dec
            cells.append(f"{model}: {per_step:.2f} s/step, {per_step * p['steps'] / 3600:.0f} h")
        print(f"    {name:32s} {prefill + kl + decode:8.0f} tokens/step   " + "   ".join(cells))


def bench_paths(args: argparse.Namespace) -> None:
    """Old vs new refinement path on the toy reasoner and on the R1 stand-in over real long traces."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsq_utils.core.config import RefinementConfig

    if args.workload in ("toy", "both"):
        model, tok, desc = load_toy(args)
        pairs = toy_pairs(tok, args.toy_responses, args.seed)
        cfg = RefinementConfig(n_candidates=args.toy_k, window=512, epsilon=args.epsilon, batch_size=64,
                               max_step_tokens=128)
        run_paths(f"(a) toy: {desc}, toy teacher traces", model, tok, pairs, cfg, args.seed, args.paths.split(","))
    if args.workload in ("r1", "both"):
        from tsq_utils.model.standin import build_standin

        with tempfile.TemporaryDirectory() as d:
            build_standin(d)
            tok = AutoTokenizer.from_pretrained(d)
            model = AutoModelForCausalLM.from_pretrained(d).to(args.device).eval()
        pairs = r1_pairs(tok, args.r1_responses, args.r1_chars)
        cfg = RefinementConfig(n_candidates=args.r1_k, window=512, epsilon=args.epsilon, batch_size=16,
                               max_step_tokens=args.r1_max_step_tokens)
        lens = pairs["chosen_tokens"].tolist()
        run_paths(f"(b) R1 stand-in ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
                  f"{len(pairs)} R1-Distill-1.5B AIME25 traces cut to {args.r1_chars} chars ({min(lens)}-{max(lens)} "
                  "tokens)", model, tok, pairs, cfg, args.seed, args.paths.split(","))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.only in ("paths", "all"):
        bench_paths(args)
    if args.only in ("kl", "all"):
        bench_kl(args)
    if args.only in ("pairs", "all"):
        bench_pairs(args)


if __name__ == "__main__":
    main()
