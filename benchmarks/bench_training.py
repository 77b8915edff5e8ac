"""Time one DPO-L training step's forward + backward: the [chosen; rejected] batch as one padded forward vs two halves.

    python benchmarks/bench_training.py                    # toy-world pairs, batch 8 and 4: about 30 s, one thread
    python benchmarks/bench_training.py --batch-size 8 --steps 20 --threads 1

TRL's collator pads the chosen and the rejected completions of a batch to one width. Preferred (chosen) responses are
the short ones, so most of the chosen half's forward runs over padding. `dpo_l.split_forward` runs each half cut
after its own last real token. Both modes compute the same per-token log-probs on real tokens (checked here on every
batch); the benchmark prints the median seconds per step of each mode and their ratio.

Pairs: toy-world problems (k = 2..8) with the oracle's concise trace as chosen and a teacher (overthinking) trace as
rejected, tokenized and collated by the same DPOLTrainer notebook 04 uses. The model is the shipped toy reasoner
when checkpoints/toy-reasoner exists (or --model PATH), else a random model of its size.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tsq_utils.model import toy_reasoner  # noqa: E402
from tsq_utils.task import toy  # noqa: E402
from tsq_utils.core.config import PretrainConfig, ToyWorldConfig, TrainingConfig  # noqa: E402
from tsq_utils.method.dpo_l import make_dpo_l_trainer, split_forward  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command-line sizes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[8, 4], help="pairs per step (one run each)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per mode (the median is reported)")
    ap.add_argument("--pairs", type=int, default=256, help="toy pairs to draw batches from")
    ap.add_argument("--model", default="", help="a saved toy reasoner folder (default: checkpoints/toy-reasoner)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def load(args: argparse.Namespace):
    """The toy reasoner and its tokenizer, or a random model of its size with a fresh toy tokenizer."""
    path = Path(args.model) if args.model else REPO / "checkpoints" / "toy-reasoner"
    if (path / "config.json").is_file():
        model, tok = toy_reasoner.load_reasoner(path)
        return model, tok, f"toy reasoner ({path.name})"
    tok = toy_reasoner.train_tokenizer(ToyWorldConfig(), vocab_size=512, n_docs=2000, seed=args.seed)
    return toy_reasoner.new_model(tok, PretrainConfig(), seed=args.seed), tok, "random model of the toy reasoner's size"


def toy_pairs(tok, n: int, seed: int) -> pd.DataFrame:
    """n pairs: the oracle's trace (chosen) against a teacher trace that is longer (rejected)."""
    rng, cfg, rows = random.Random(seed), ToyWorldConfig(), []
    for p in toy.make_problems(4 * n, seed=seed):
        chosen, rejected = toy.oracle_trace(p), toy.teacher_trace(p, rng, cfg)
        if len(rejected) > len(chosen):
            rows.append({"prompt": toy.prompt_for(p.question, tok), "chosen": chosen, "rejected": rejected})
        if len(rows) == n:
            break
    return pd.DataFrame(rows)


def time_mode(model, batches: list[dict], split: bool) -> tuple[float, list[torch.Tensor]]:
    """Median seconds of forward + backward per batch, and the masked per-token log-probs of each batch."""
    times, logps = [], []
    for b in batches:
        mask = b["completion_mask"][:, 1:]
        kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "use_cache": False}
        labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if split:
            lp = split_forward(model, kw, labels, mask.size(1)).log_probs
        else:
            lp = model(**kw, labels=labels, fused_lm_head=True).log_probs[:, -mask.size(1):]
        (lp * mask).sum().backward()
        times.append(time.perf_counter() - t0)
        logps.append((lp * mask).detach())
    return statistics.median(times), logps


def main() -> None:
    """Print seconds per step of the joint and the split forward for each batch size, and their ratio."""
    import datasets

    args = parse_args()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok, what = load(args)
    model.train()
    pairs = toy_pairs(tok, args.pairs, args.seed)
    print(f"model: {what}; {len(pairs)} toy pairs, chosen {pairs['chosen'].str.len().mean():.0f} / rejected "
          f"{pairs['rejected'].str.len().mean():.0f} characters on average; {args.threads} thread(s)")
    for bs in args.batch_size:
        with tempfile.TemporaryDirectory() as tmp:
            # one step is shorter than an epoch: no reference pass over the data (only the batches are needed)
            trainer = make_dpo_l_trainer(model, None, tok, pairs, TrainingConfig(batch_size=bs), tmp, seed=args.seed,
                                         max_steps=1, device="cpu", disable_tqdm=True)
            loader = iter(trainer.get_train_dataloader())
            batches = [next(loader) for _ in range(args.steps + 1)]
        pad = [1 - float(b["attention_mask"].float().mean()) for b in batches]
        joint, lp_joint = time_mode(model, batches, split=False)
        split, lp_split = time_mode(model, batches, split=True)
        for a, b in zip(lp_joint, lp_split):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        print(f"batch {bs} pairs ({2 * bs} sequences, {100 * statistics.mean(pad):.0f}% padding when joint): "
              f"joint {joint:.3f} s/step, split {split:.3f} s/step, {joint / split:.2f}x")


if __name__ == "__main__":
    main()
