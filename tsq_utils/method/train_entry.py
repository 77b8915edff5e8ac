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
import json
import os
from pathlib import Path
from typing import Any


def job_from_profile(profile_name: str, run_dir: str | Path, max_steps: int | None = None) -> dict[str, Any]:
    """The job a notebook-04 run of this profile would write: its pairs, base model, training settings and seed."""
    import dataclasses

    from ..model import base_model
    from . import dpo_l
    from ..core.config import load_profile, stage_seed

    prof = load_profile(profile_name)
    run_dir = Path(run_dir)
    pairs = run_dir / "refinement" / "refined_pairs.parquet"
    if not pairs.is_file():
        raise FileNotFoundError(f"{pairs} is missing: run notebooks/03_kl_refinement.ipynb first (profile {prof.name})")
    ref, kind = base_model.base_ref(run_dir, prof)
    if kind == "hub":
        ref = base_model.hub_model_ref(prof) if ref == prof.model.path else ref
    stage_dir = run_dir / "training"
    from ..core.artifacts import load_table

    fingerprint = dpo_l._run_fingerprint(load_table(pairs), prof.training, stage_seed(prof.seed, "training"), max_steps,
                                         dpo_l.num_processes(prof.training))
    resume = dpo_l._resume_point(stage_dir / ".trainer", fingerprint, is_main=os.environ.get("RANK", "0") == "0")
    return {"model": ref, "tokenizer": ref, "dtype": prof.model.dtype if kind == "hub" else "float32",
            "training": dataclasses.asdict(prof.training), "seed": stage_seed(prof.seed, "training"),
            "max_steps": max_steps, "device": "cuda" if prof.device != "cpu" else "cpu", "pairs": str(pairs),
            "stage_dir": str(stage_dir), "model_subdir": "model", "log": str(stage_dir / "training_log.parquet"),
            "resume": resume}


def run_job(job: dict[str, Any]) -> None:
    """Train one job in this process (one rank of a launched run, or the only process) and save on the main one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import dpo_l
    from ..core.artifacts import load_table, save_table
    from ..core.config import TrainingConfig

    device = job["device"]
    if device == "cpu":
        torch.set_num_threads(1)  # each process gets a core; more threads per process only fight
    cfg = TrainingConfig(**job["training"])
    torch.manual_seed(job["seed"])
    tok = AutoTokenizer.from_pretrained(job["tokenizer"], trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    load_dtype = getattr(torch, job["dtype"])
    # bf16 training keeps fp32 master weights (autocast does the bf16 compute); load them in fp32 straight away
    dtype = torch.float32 if cfg.bf16 else load_dtype
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False)
    pairs = load_table(job["pairs"])
    stage_dir = Path(job["stage_dir"])
    trainer = dpo_l.make_dpo_l_trainer(model, None, tok, pairs, cfg, output_dir=str(stage_dir / ".trainer"),
                                       seed=job["seed"], max_steps=job["max_steps"],
                                       device="cpu" if device == "cpu" else "auto", **dpo_l.checkpoint_settings(cfg))
    trainer.train(resume_from_checkpoint=job.get("resume"))
    if trainer.accelerator.is_main_process:
        save_table(dpo_l.training_log(trainer).reset_index(), Path(job["log"]))
    if load_dtype != torch.float32 and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        trainer.model.to(load_dtype)  # saved in the dtype it was loaded in
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
