"""Time sampling on the toy reasoner: batched (one generate call per batch of rows) vs one sample at a time.

    python benchmarks/bench_sampling.py                       # small defaults, well under a minute on one CPU thread
    python benchmarks/bench_sampling.py --prompts 16 --n 8 --max-new-tokens 400 --batch-size 128
    python benchmarks/bench_sampling.py --device cuda --threads 0

Uses the shipped toy reasoner (checkpoints/toy-reasoner, or --model PATH) when present, else a freshly
initialised model of the profile's config with a freshly trained tokenizer (2,000 documents; an untrained
model seldom emits EOS, so nearly every sample runs to --max-new-tokens). Both modes call generation.sample
on the same prompts with the same seed; throughput is completion tokens as the project counts them (the
decoded text re-tokenized: no prompt, no padding) per wall-clock second, after one warm-up call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tsq_utils.model import toy_reasoner  # noqa: E402
from tsq_utils.task import toy  # noqa: E402
from tsq_utils.core.config import load_profile, set_threads  # noqa: E402
from tsq_utils.model.generation import SampleResult, sample  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line sizes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4, help="toy problems (k spread over the profile's range)")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64, help="rows per generate call in the batched mode")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--profile", default="toy", help="profile whose toy world and model config are used")
    ap.add_argument("--model", default="", help="a saved toy reasoner folder (default: checkpoints/toy-reasoner)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 keeps torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("prompts", "n", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def load(args: argparse.Namespace, profile):
    """(model, tokenizer, description): the saved reasoner if present, else a fresh one of the profile's config."""
    path = Path(args.model) if args.model else REPO / profile.model.path
    if (path / "model.safetensors").exists():
        model, tok = toy_reasoner.load_reasoner(path, device=args.device)
        return model, tok, f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path} (trained)"
    if args.model:
        raise SystemExit(f"no toy reasoner at {path}")
    tok = toy_reasoner.train_tokenizer(profile.toyworld, profile.pretrain.vocab_size, 2000, args.seed)
    model = toy_reasoner.new_model(tok, profile.pretrain, args.seed).to(args.device).eval()
    return model, tok, f"freshly initialised {profile.name} config ({path} is absent; untrained, it seldom emits EOS)"


def run(model, tok, prompts: list[str], args: argparse.Namespace, batch_size: int) -> tuple[float, SampleResult]:
    """Wall seconds and result of one sample() call."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = sample(model, tok, prompts, n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                 seed=args.seed, batch_size=batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, res


def describe(name: str, secs: float, res: SampleResult) -> tuple[float, str]:
    """Tokens per second and a report line."""
    toks = sum(map(sum, res.n_tokens))
    rows = sum(map(len, res.n_tokens))
    stopped = sum(r == "stop" for row in res.finish_reasons for r in row)
    rate = toks / secs
    return rate, (f"{name:<22} {secs:7.2f} s  {toks:6d} tokens  {rate:8.1f} tokens/s  "
                  f"({rows} samples, {stopped} ended on EOS, mean {toks / rows:.1f} tokens)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    profile = load_profile(args.profile)
    model, tok, desc = load(args, profile)
    w = profile.toyworld
    problems = toy.make_problems(args.prompts, seed=args.seed, k_min=w.k_min, k_max=w.k_max, max_value=w.max_value,
                                split="bench")
    prompts = [toy.prompt_for(p.question, tok) for p in problems]
    print(f"model: {desc}, {toy_reasoner.count_parameters(model) / 1e6:.2f}M parameters, device {args.device}, "
          f"torch threads {threads}, torch {torch.__version__}")
    print(f"work: {args.prompts} prompts (k {sorted({p.k for p in problems})}) x {args.n} samples, "
          f"max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, batch size {args.batch_size}")
    run(model, tok, prompts[:1], argparse.Namespace(**{**vars(args), "n": 1, "max_new_tokens": 4}), 1)  # warm-up
    t_b, res_b = run(model, tok, prompts, args, args.batch_size)
    t_1, res_1 = run(model, tok, prompts, args, 1)
    rate_b, line_b = describe(f"batched ({args.batch_size}/call)", t_b, res_b)
    rate_1, line_1 = describe("one at a time", t_1, res_1)
    print(line_b)
    print(line_1)
    print(f"speed-up (tokens/s, batched / one at a time): {rate_b / rate_1:.2f}x")


if __name__ == "__main__":
    main()
