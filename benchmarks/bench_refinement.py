"""Time refinement: windowed-KL scoring of K candidates, and refine_pairs end to end, batched vs one at a time.

    python benchmarks/bench_refinement.py                # small defaults: about 30 s of CPU time, one thread
    python benchmarks/bench_refinement.py --k 64 --window 512 --prefix 1024 --device cuda
    python benchmarks/bench_refinement.py --only pairs --responses 7 --sample-batch-size 64 256 --pairs-repeats 3

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
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tsq_utils.refinement import kl_window  # noqa: E402


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
    ap.add_argument("--only", choices=("kl", "pairs", "all"), default="all", help="which part to run")
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
    from tsq_utils import toyworld
    from tsq_utils.config import PretrainConfig, ToyWorldConfig

    path = Path(args.model) if args.model else REPO / "checkpoints" / "toy-reasoner"
    if (path / "model.safetensors").exists():
        model, tok = toyworld.load_reasoner(path, device=args.device)
        return model, tok, f"{path.name} ({toyworld.count_parameters(model) / 1e6:.2f}M params)"
    if args.model:
        raise SystemExit(f"no safetensors model at {path}")
    pcfg = PretrainConfig()
    tok = toyworld.train_tokenizer(ToyWorldConfig(), vocab_size=pcfg.vocab_size, n_docs=500, seed=args.seed)
    model = toyworld.new_model(tok, pcfg, seed=args.seed).to(args.device).eval()
    return model, tok, (f"random toy-size Llama ({toyworld.count_parameters(model) / 1e6:.2f}M params, hidden "
                        f"{pcfg.hidden_size}, {pcfg.num_layers} layers)")


def toy_pairs(tok, n: int, seed: int):
    """A pairs table with n distinct chosen responses: toy teacher traces with k = 2..8 operands."""
    import random

    import pandas as pd

    from tsq_utils import toyworld
    from tsq_utils.config import ToyWorldConfig

    cfg, rng = ToyWorldConfig(), random.Random(f"bench:{seed}")
    rows = []
    for i in range(n):
        p = toyworld.make_problem(rng, 2 + i % 7, cfg.max_value, f"bench-{i}")
        text = toyworld.teacher_trace(p, rng, cfg)
        rows.append(dict(problem_id=p.problem_id, prompt=toyworld.prompt_for(p.question, tok), chosen=text,
                         chosen_tokens=len(tok(text, add_special_tokens=False)["input_ids"]), chosen_sample_idx=0))
    return pd.DataFrame(rows)


class SampleTimer:
    """Wraps refinement.sample to add up the wall and CPU time spent sampling and the rows drawn."""

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
    import tsq_utils.refinement as refinement
    from tsq_utils.config import RefinementConfig
    from tsq_utils.refinement import count_steps, refine_pairs

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
        return lambda: [refine_pairs(model, tok, pairs, cfg, seed=args.seed, progress=False, sample_batch_size=bs)]

    def one_at_a_time():
        # K rows per generate call: each call holds the candidates of one step, as per-step sampling did
        return [refine_pairs(model, tok, pairs.iloc[[i]], cfg, seed=args.seed, progress=False, sample_batch_size=args.k)
                for i in range(len(pairs))]

    modes = {f"one at a time ({args.k} rows/call)": one_at_a_time}
    modes.update({f"batched ({bs} rows/call)": batched(bs) for bs in args.sample_batch_size})
    real_sample = refinement.sample
    stats: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in modes}
    info: dict[str, str] = {}
    try:
        with torch.no_grad():  # warm-up: first-call costs (kernels, stop-string tables) land in no mode
            refine_pairs(model, tok, pairs.iloc[:1], cfg, seed=args.seed, progress=False, sample_batch_size=args.k)
            for _ in range(args.pairs_repeats):
                for name, fn in modes.items():
                    timer = SampleTimer(real_sample)
                    refinement.sample = timer
                    t0, c0 = time.perf_counter(), time.process_time()
                    outs = fn()
                    stats[name].append((time.perf_counter() - t0, time.process_time() - c0, timer.wall, timer.cpu))
                    log = [o[1] for o in outs]
                    accepted = sum(int(x["accepted"].sum()) for x in log)
                    sampled = sum(int((x["skipped"] == "").sum()) for x in log)
                    info[name] = f"{timer.rows} rows in {timer.calls} sample calls, {accepted}/{sampled} steps accepted"
    finally:
        refinement.sample = real_sample
    med = {name: [statistics.median(x[i] for x in v) for i in range(4)] for name, v in stats.items()}
    base_name = next(iter(modes))
    base_cpu = med[base_name][1]
    for name, (wall, cpu, s_wall, s_cpu) in med.items():
        print(f"  {name:28s} wall {wall:6.2f} s  CPU {cpu:6.2f} s  {len(pairs) / cpu:6.2f} responses/s (CPU)  "
              f"sampling CPU {s_cpu:6.2f} s, scoring+rest CPU {cpu - s_cpu:5.2f} s  x{base_cpu / cpu:4.2f}  "
              f"({info[name]})")
    print("ratio batched/one-at-a-time throughput (CPU time): "
          + ", ".join(f"{name.split('(')[1][:-1]}: {base_cpu / m[1]:.2f}" for name, m in med.items() if name != base_name))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.only in ("kl", "all"):
        bench_kl(args)
    if args.only in ("pairs", "all"):
        bench_pairs(args)


if __name__ == "__main__":
    main()
