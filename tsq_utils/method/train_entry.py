"""Training entry point: DPO-L + SFT in one process of a multi-process (multi-GPU) run, launched by accelerate.

    accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 8 \\
        -m tsq_utils.method.train_entry --profile r1-7b --run-dir runs/r1-7b

trains on runs/<profile>/refinement/refined_pairs.parquet from the base model notebook 00 recorded, and writes
runs/<profile>/training/model/ and training_log.parquet (notebook 04 then records the stage). Notebook 04 does the
same through dpo_l.train_and_save, which writes a job file (--job) with the notebook's settings and launches this
module when training.num_processes > 1. Run directly (python -m ...) it trains in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

from ..core.artifacts import load_table, save_table
from ..core.config import TrainingConfig, load_profile, resolve_device, stage_seed
from ..model import base_model
from . import dpo_l


def job_from_profile(profile_name: str, run_dir: str | Path, max_steps: int | None = None) -> dict[str, Any]:
    """The job a notebook-04 run of this profile would write: its pairs, base model, training settings and seed."""
    prof = load_profile(profile_name)
    run_dir = Path(run_dir)
    pairs = run_dir / "refinement" / "refined_pairs.parquet"
    if not pairs.is_file():
        raise FileNotFoundError(f"{pairs} is missing: run notebooks/03_kl_refinement.ipynb first (profile {prof.name})")
    ref, kind = base_model.base_ref(run_dir, prof)
    source = base_model.model_source(kind)  # its registry entry says what to load and in which dtype
    ref = source.resolve(ref, prof)
    stage_dir = run_dir / "training"
    fingerprint = dpo_l._run_fingerprint(load_table(pairs), prof.training, stage_seed(prof.seed, "training"), max_steps,
                                         dpo_l.num_processes(prof.training))
    resume = dpo_l._resume_point(stage_dir / ".trainer", fingerprint, is_main=os.environ.get("RANK", "0") == "0")
    return {"model": ref, "tokenizer": ref, "dtype": source.dtype(prof),
            "training": dataclasses.asdict(prof.training), "seed": stage_seed(prof.seed, "training"),
            "max_steps": max_steps, "device": resolve_device(prof), "pairs": str(pairs),
            "stage_dir": str(stage_dir), "model_subdir": "model", "log": str(stage_dir / "training_log.parquet"),
            "resume": resume}


def load_dtype(cfg, saved_dtype: str):
    """The dtype the training processes load the weights in. Under DeepSpeed with bf16: bf16 (its bf16 section holds
    the model in bf16 and keeps the fp32 master weights in its optimizer; loading fp32 would only double the
    load-time memory). bf16 without DeepSpeed: fp32 (bf16 autocast over fp32 weights). Otherwise as saved."""
    if cfg.bf16:
        return torch.bfloat16 if dpo_l.deepspeed_enabled() else torch.float32
    return getattr(torch, saved_dtype)


class StepPrinter(TrainerCallback):
    """One line per twentieth of the run on the main process (step, loss terms): what a notebook shows of a launched
    training, whose processes' progress bars would not reach it."""

    LINES = 20

    def on_log(self, args, state, control, logs=None, **kwargs):
        every = max(1, state.max_steps // self.LINES)
        step = state.global_step
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        if step % every == 0 or step == state.max_steps:
            terms = ", ".join(f"{k} {float(logs[k]):.4f}" for k in ("loss", "dpo_l_loss", "sft_loss") if k in logs)
            print(f"step {step}/{state.max_steps}: {terms}", flush=True)


def _quiet_libraries() -> None:
    """A notebook's launch shows this output in its cell: the libraries' deprecation notices and one-off data
    warnings off, as lessons.quiet does in the notebook's own process (not imported: method sits below lessons)."""
    for name in ("trl", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    libraries = r"(transformers|trl|datasets|accelerate|torch)(\..*)?"
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=libraries)


def run_job(job: dict[str, Any]) -> None:
    """Train one job in this process (one rank of a launched run, or the only process) and save on the main one."""
    device = job["device"]
    if device == "cpu":
        torch.set_num_threads(1)  # each process gets a core; more threads per process only fight
    cfg = TrainingConfig(**job["training"])
    torch.manual_seed(job["seed"])
    tok = AutoTokenizer.from_pretrained(job["tokenizer"], trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pairs = load_table(job["pairs"])
    stage_dir = Path(job["stage_dir"])
    # The training arguments before the weights: under DeepSpeed, building them registers its config with
    # transformers, so that from_pretrained builds the model under ZeRO-3's zero.Init, each rank holding only its
    # shard (built after from_pretrained, each of 8 ranks would first hold the whole 7B model in host RAM).
    # `args` must stay alive until the model is loaded (transformers keeps only a weak reference).
    run = dpo_l.TrainRun(seed=job["seed"], device="cpu" if device == "cpu" else "auto", max_steps=job["max_steps"])
    compact = bool(job.get("compact_progress"))
    if compact:
        _quiet_libraries()
    overrides = {**dpo_l.checkpoint_settings(cfg), **({"disable_tqdm": True} if compact else {})}
    args = dpo_l.training_args(cfg, str(stage_dir / ".trainer"), run, n_pairs=len(pairs),
                               options=dpo_l.TrainerOptions(overrides=overrides))
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=load_dtype(cfg, job["dtype"]),
                                                 use_safetensors=True, trust_remote_code=False)
    trainer = dpo_l.make_dpo_l_trainer(model, None, tok, pairs, cfg, str(stage_dir / ".trainer"), run,
                                       dpo_l.TrainerOptions(args=args))
    if compact:  # disable_tqdm swaps the bar for a printer of every log line: a line per twentieth instead
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(StepPrinter())
    trainer.train(resume_from_checkpoint=job.get("resume"))
    if trainer.accelerator.is_main_process:
        save_table(dpo_l.training_log(trainer).reset_index(), Path(job["log"]))
    # saved in the precision it trained in (fp32 master weights), not cast back to the dtype it was loaded in
    dpo_l.save_trained(trainer, tok, stage_dir / job["model_subdir"])


def main(argv: list[str] | None = None) -> None:
    """Command line: --job FILE (written by dpo_l.launch_training) or --profile NAME --run-dir DIR."""
    ap = argparse.ArgumentParser(prog="python -m tsq_utils.method.train_entry", description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", help="a job file written by dpo_l.launch_training")
    ap.add_argument("--profile", help="profile name (with --run-dir): train notebook 04's stage of this run")
    ap.add_argument("--run-dir", help="the profile's run folder, e.g. runs/r1-7b")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    args = ap.parse_args(argv)
    if args.job:
        job = json.loads(Path(args.job).read_text())
    elif args.profile and args.run_dir:
        job = job_from_profile(args.profile, args.run_dir, args.max_steps)
    else:
        ap.error("give --job FILE, or --profile NAME and --run-dir DIR")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and job["device"] == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    run_job(job)


if __name__ == "__main__":
    main()
