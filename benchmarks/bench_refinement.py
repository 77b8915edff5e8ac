"""Time windowed-KL scoring of K candidate steps: batched (with and without the prefix KV cache) vs one at a time.

    python benchmarks/bench_refinement.py                # small defaults, well under 30 s on one CPU thread
    python benchmarks/bench_refinement.py --k 64 --window 512 --prefix 1024 --device cuda

Uses the shipped toy reasoner when checkpoints/toy-reasoner exists (or --model PATH), else a small
random Llama. Inputs are random token ids; the timings do not depend on what the tokens say.
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


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
