"""Time DPO-L training on the toy profile's notebook-04 workload: where a training's time goes, and what it saves.

    python benchmarks/bench_training.py                    # all parts, one thread: about 2 minutes
    python benchmarks/bench_training.py --parts steps --trainer-steps 40 --threads 1
    python benchmarks/bench_training.py --parts ranks --trainer-steps 60   # 1 vs 2 training processes, wall time

Part "steps" (notebook 04 as it trains: the toy profile's training settings, TRL's DPOTrainer loop): CPU seconds
(time.process_time, which another process on the box does not inflate the way it does wall time) of the set-up
(tokenization by TRL), the reference scoring pass, and per optimizer step its forward (policy, both halves), backward,
and the rest (optimizer, scheduler, logging, collation), from wrappers around the trainer's own methods.

Part "reference": the reference pass over the dataset as TRL 1.16 computes it (one padded [chosen; rejected] forward
per batch in dataset order, written to an Arrow cache file) against DPOLTrainer's (batches of similar length, each
half cut at its last real token, kept in memory; rank-safe), on the same pairs, and the cache that lets later
trainings of the same base model on the same pairs (notebook 06's rows, a rerun of 04) skip it.

Part "split": one step's forward + backward with the [chosen; rejected] batch as one padded forward, as two halves
each cut after its own last real token, and as groups of rows of similar length (`dpo_l.split_forward`'s
rows_per_forward; notebook 04 uses groups of ROWS_PER_FORWARD). TRL's collator pads the chosen and the rejected
completions of a batch to one width, and each half to its longest sequence. Every mode computes the same per-token
log-probs on real tokens (checked here on every batch).

Part "ranks" (notebook 04 with training.num_processes 1 or 2): the same pairs, steps and global batch (the toy
profile's 8) trained in this process (batch 8) and by two data-parallel processes over gloo (batch 4 each,
`accelerate launch`, one torch thread each), wall seconds from the call to the saved model, process start included.
Run it alone: it measures cores.

Pairs: a pairs table (--pairs-file, e.g. runs/toy/refinement/refined_pairs.parquet, notebook 04's input), or
toy-world problems with the oracle's concise trace as chosen and a teacher (overthinking) trace as rejected,
tokenized and collated by the same DPOLTrainer notebook 04 uses. The model is the shipped toy reasoner when
checkpoints/toy-reasoner exists (or --model PATH), else a random model of its size.
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
from tsq_utils.core.config import PretrainConfig, ToyWorldConfig, TrainingConfig, load_profile  # noqa: E402
from tsq_utils.method.dpo_l import TrainerOptions, TrainRun, make_dpo_l_trainer, split_forward  # noqa: E402

QUIET = TrainerOptions(overrides={"disable_tqdm": True})


def parse_args() -> argparse.Namespace:
    """Command-line sizes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[8, 4], help="pairs per step (one run each)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per mode (the median is reported)")
    ap.add_argument("--pairs", type=int, default=256, help="toy pairs to draw batches from")
    ap.add_argument("--pairs-file", default="", help="a pairs parquet (prompt, chosen, rejected) instead of toy pairs")
    ap.add_argument("--model", default="", help="a saved toy reasoner folder (default: checkpoints/toy-reasoner)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", nargs="+", default=["steps", "reference", "split"],
                    choices=["steps", "reference", "split", "ranks"])
    ap.add_argument("--groups", type=int, nargs="+", default=[8, 4, 2],
                    help="rows per forward of part 'split' (split_forward's rows_per_forward)")
    ap.add_argument("--trainer-steps", type=int, default=30, help="optimizer steps timed in part 'steps'")
    return ap.parse_args()


def load(args: argparse.Namespace):
    """The toy reasoner and its tokenizer, or a random model of its size with a fresh toy tokenizer."""
    path = Path(args.model) if args.model else REPO / "checkpoints" / "toy-reasoner"
    if (path / "config.json").is_file():
        model, tok = toy_reasoner.load_reasoner(path)
        return model, tok, f"toy reasoner ({path.name})"
    tok = toy_reasoner.train_tokenizer(ToyWorldConfig(), vocab_size=512, n_docs=2000, seed=args.seed)
    return toy_reasoner.new_model(tok, PretrainConfig(), seed=args.seed), tok, "random model of the toy reasoner's size"


def toy_pairs(tok, n: int, seed: int, pairs_file: str = "") -> pd.DataFrame:
    """n pairs: a seeded sample of pairs_file's, or the oracle's trace (chosen) against a longer teacher trace."""
    if pairs_file:
        table = pd.read_parquet(pairs_file)[["prompt", "chosen", "rejected"]]
        return table.sample(n=min(n, len(table)), random_state=seed).reset_index(drop=True)
    rng, cfg, rows = random.Random(seed), ToyWorldConfig(), []
    for p in toy.make_problems(4 * n, seed=seed):
        chosen, rejected = toy.oracle_trace(p), toy.teacher_trace(p, rng, cfg)
        if len(rejected) > len(chosen):
            rows.append({"prompt": toy.prompt_for(p.question, tok), "chosen": chosen, "rejected": rejected})
        if len(rows) == n:
            break
    return pd.DataFrame(rows)


def time_mode(model, batches: list[dict], split: int | None) -> tuple[float, list[torch.Tensor]]:
    """Median CPU seconds of forward + backward per batch, and the masked per-token log-probs of each batch."""
    times, logps = [], []
    for b in batches:
        mask = b["completion_mask"][:, 1:]
        kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "use_cache": False}
        labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
        model.zero_grad(set_to_none=True)
        t0 = cpu()
        if split is not None:
            lp = split_forward(model, kw, labels, mask.size(1), split).log_probs
        else:
            lp = model(**kw, labels=labels, fused_lm_head=True).log_probs[:, -mask.size(1):]
        (lp * mask).sum().backward()
        times.append(cpu() - t0)
        logps.append((lp * mask).detach())
    return statistics.median(times), logps


def cpu() -> float:
    return time.process_time()


def part_steps(model, tok, args) -> None:
    """Notebook 04's training loop on the toy profile's settings: set-up, reference pass, and per-step phases."""
    import copy

    from transformers import PrinterCallback

    cfg = load_profile("toy").training
    n = args.trainer_steps * cfg.batch_size * cfg.grad_accum  # one epoch of exactly trainer_steps steps
    pairs = toy_pairs(tok, n, args.seed, args.pairs_file)
    model = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = cpu()
        trainer = make_dpo_l_trainer(model, None, tok, pairs, cfg, tmp, TrainRun(seed=args.seed, device="cpu"), QUIET)
        setup = cpu() - t0
        trainer.remove_callback(PrinterCallback)  # disable_tqdm swaps the bar for a printer of every log line
        ds = trainer.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
        t0 = cpu()
        trainer._score_reference(ds, cfg.batch_size)
        ref = cpu() - t0
        spent = {"forward": 0.0, "backward": 0.0}

        def timed(name, fn):
            def run(*a, **k):
                t = cpu()
                try:
                    return fn(*a, **k)
                finally:
                    spent[name] += cpu() - t
            return run

        trainer.compute_loss = timed("forward", trainer.compute_loss)
        trainer.accelerator.backward = timed("backward", trainer.accelerator.backward)
        t0 = cpu()
        trainer.train()
        total = cpu() - t0
    steps = trainer.state.global_step
    rest = total - spent["forward"] - spent["backward"]
    print(f"Part steps: toy profile training (batch {cfg.batch_size}, max_length {cfg.max_length}), {len(pairs)} "
          f"pairs, {steps} steps, CPU seconds")
    print(f"  set-up: tokenize {setup - ref:.2f} s + reference pass {ref:.2f} s "
          f"({1000 * ref / len(pairs):.1f} ms/pair)")
    print(f"  per step: {total / steps:.3f} s = forward {spent['forward'] / steps:.3f} + backward "
          f"{spent['backward'] / steps:.3f} + rest (optimizer, scheduler, logging, collation) {rest / steps:.3f}")
    print(f"  a reference forward per step instead (on the fly) would add about {ref / steps:.3f} s/step "
          f"({100 * ref / total:.0f}% of the training)")


def part_reference(model, tok, args) -> None:
    """TRL 1.16's reference pass against DPOLTrainer's, and the cache across trainings."""
    from trl import DPOTrainer

    cfg = load_profile("toy").training
    pairs = toy_pairs(tok, args.pairs, args.seed, args.pairs_file)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_dpo_l_trainer(model, None, tok, pairs, cfg, tmp, TrainRun(seed=args.seed, device="cpu"), QUIET)
        ds = trainer.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
        t0 = cpu()
        theirs = DPOTrainer._precompute_ref_logps(trainer, ds, "train", cfg.batch_size)
        t_trl = cpu() - t0
        t0 = cpu()
        chosen, rejected = trainer._score_reference(ds, cfg.batch_size)
        t_ours = cpu() - t0
        torch.testing.assert_close(chosen, torch.tensor(theirs["ref_chosen_logps"]), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(rejected, torch.tensor(theirs["ref_rejected_logps"]), rtol=1e-4, atol=1e-3)
        cache = Path(tmp) / "refcache"
        t0 = cpu()
        cached = TrainRun(seed=args.seed, device="cpu", ref_cache=str(cache))
        make_dpo_l_trainer(model, None, tok, pairs, cfg, Path(tmp) / "a", cached, QUIET)
        t_miss = cpu() - t0
        t0 = cpu()
        hit = make_dpo_l_trainer(model, None, tok, pairs, cfg, Path(tmp) / "b", cached, QUIET)
        t_hit = cpu() - t0
        assert hit.ref_cache_hit
    print(f"Part reference: {len(pairs)} pairs, batch {cfg.batch_size}, CPU seconds")
    print(f"  TRL 1.16 (padded joint forward, dataset order, Arrow file): {t_trl:.2f} s; DPOLTrainer (length-sorted, "
          f"split halves, in memory): {t_ours:.2f} s, {t_trl / t_ours:.2f}x; same log-probs (checked)")
    print(f"  trainer set-up with ref_cache: first training {t_miss:.2f} s (tokenize + score + store), a later one on "
          f"the same pairs {t_hit:.2f} s (tokenize + hash + read)")


def part_split(model, tok, args) -> None:
    """Print seconds per step of the joint and the split forward for each batch size, and their ratio."""
    pairs = toy_pairs(tok, args.pairs, args.seed, args.pairs_file)
    print(f"Part split: {len(pairs)} toy pairs, chosen {pairs['chosen'].str.len().mean():.0f} / rejected "
          f"{pairs['rejected'].str.len().mean():.0f} characters on average")
    for bs in args.batch_size:
        with tempfile.TemporaryDirectory() as tmp:
            # one step is shorter than an epoch: no reference pass over the data (only the batches are needed)
            trainer = make_dpo_l_trainer(model, None, tok, pairs, TrainingConfig(batch_size=bs), tmp,
                                         TrainRun(seed=args.seed, device="cpu", max_steps=1), QUIET)
            loader = iter(trainer.get_train_dataloader())
            batches = [next(loader) for _ in range(args.steps + 1)]
        pad = [1 - float(b["attention_mask"].float().mean()) for b in batches]
        joint, lp_joint = time_mode(model, batches, split=None)
        modes = {"halves": 0, **{f"groups of {g}": g for g in args.groups}}
        line = f"  batch {bs} pairs ({2 * bs} sequences, {100 * statistics.mean(pad):.0f}% padding when joint): " \
               f"joint {joint:.3f} s/step"
        for label, g in modes.items():
            t, lp = time_mode(model, batches, split=g)
            for a, b in zip(lp_joint, lp):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            line += f", {label} {t:.3f} ({joint / t:.2f}x)"
        print(line)


def part_ranks(model, tok, args) -> None:
    """Wall seconds of one training in this process against the same training in two data-parallel processes."""
    from dataclasses import replace

    from tsq_utils.method.dpo_l import global_batch, train_and_save

    base = load_profile("toy").training
    per_step = global_batch(base)
    pairs = toy_pairs(tok, args.trainer_steps * per_step, args.seed, args.pairs_file)
    print(f"Part ranks: {len(pairs)} pairs, {args.trainer_steps} steps of {per_step} pairs, "
          f"wall seconds (set-up, reference pass, steps, save)")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "base"
        model.save_pretrained(src)
        tok.save_pretrained(src)
        walls, losses = {}, {}
        for n_proc in (1, 2):
            cfg = replace(base, num_processes=n_proc, batch_size=per_step // (n_proc * base.grad_accum))
            m = toy_reasoner.load_reasoner(src)[0]  # the two processes load these weights from src themselves
            t0 = time.perf_counter()
            log = train_and_save(m, tok, pairs, cfg, Path(tmp) / f"p{n_proc}", TrainRun(seed=args.seed, device="cpu"))
            walls[n_proc] = time.perf_counter() - t0
            losses[n_proc] = float(log["loss"].iloc[-8:].mean())
            print(f"  {n_proc} process(es) x batch {cfg.batch_size}: {walls[n_proc]:.1f} s, "
                  f"{walls[n_proc] / args.trainer_steps:.3f} s/step overall, mean loss of the last 8 steps "
                  f"{losses[n_proc]:.4f}")
    print(f"  speed-up of 2 processes: {walls[1] / walls[2]:.2f}x (the same global batches; the losses differ only by "
          f"float rounding of the split batch: {abs(losses[1] - losses[2]):.2e})")


def main() -> None:
    import os

    import datasets

    args = parse_args()
    datasets.disable_progress_bars()
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok, what = load(args)
    model.train()
    print(f"model: {what}; {args.threads} thread(s)")
    parts = {"steps": part_steps, "reference": part_reference, "split": part_split, "ranks": part_ranks}
    for part in args.parts:
        parts[part](model, tok, args)


if __name__ == "__main__":
    main()
