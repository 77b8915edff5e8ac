"""Training DPO-L + SFT and saving the model: in this process, or in training.num_processes processes (launch.py),
resuming from the trainer's last checkpoint of the same run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch
from transformers import PrinterCallback

from ...core.artifacts import atomic_dir
from ...core.config import TrainingConfig
from .build import TrainerOptions, TrainRun, make_dpo_l_trainer, num_processes, training_log
from .checkpoints import _resume_point, _run_fingerprint, checkpoint_settings
from .launch import launch_training


def train_and_save(model, tokenizer, pairs: pd.DataFrame, cfg: TrainingConfig, stage_dir, run: TrainRun,
                   model_subdir: str = "model") -> pd.DataFrame:
    """Train DPO-L + SFT on a pairs table, save the model (safetensors) atomically, and return the per-step log.

    The model is saved in the precision it trained in: fp32 (bf16 training keeps fp32 weights; casting them back to
    bf16 would drop every update smaller than bf16's rounding step). run.ref_cache: see make_dpo_l_trainer
    (in-process training only).

    With training.num_processes > 1 the training runs in that many processes under `accelerate launch` (see
    launch_training); otherwise here. With training.save_steps the trainer checkpoints under stage_dir/.trainer, and
    a rerun of the same training (same settings, seed and pairs) resumes from the last checkpoint.
    """
    stage_dir = Path(stage_dir)
    if num_processes(cfg) > 1:
        return launch_training(model, tokenizer, pairs, cfg, stage_dir, run, model_subdir)
    return _train_here(model, tokenizer, pairs, cfg, stage_dir, run, model_subdir)


def _train_here(model, tokenizer, pairs: pd.DataFrame, cfg: TrainingConfig, stage_dir: Path, run: TrainRun,
                model_subdir: str) -> pd.DataFrame:
    """train_and_save in this process."""
    scratch = stage_dir / ".trainer"
    resume = _resume_point(scratch, _run_fingerprint(pairs, cfg, run.seed, run.max_steps, 1))
    overrides = {**checkpoint_settings(cfg), **({} if run.progress else {"disable_tqdm": True})}
    trainer = make_dpo_l_trainer(model, None, tokenizer, pairs, cfg, str(scratch), run,
                                 TrainerOptions(overrides=overrides))
    if not run.progress:
        trainer.remove_callback(PrinterCallback)  # disable_tqdm swaps the bar for a printer of every log line
    trainer.train(resume_from_checkpoint=resume)
    log = training_log(trainer)
    save_trained(trainer, tokenizer, stage_dir / model_subdir)
    shutil.rmtree(scratch, ignore_errors=True)
    return log


def save_trained(trainer, tokenizer, dest) -> None:
    """Save the trained model and tokenizer into dest atomically; on every process, as ZeRO-3/FSDP gathers need them.

    trainer.save_model gathers sharded weights and writes on the main process only; the main process then swaps the
    finished folder in, so dest is never half-written and never written twice.
    """
    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.saving"
    acc = trainer.accelerator
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    if trainer.is_deepspeed_enabled:
        # DeepSpeed's bf16 section holds the model in bf16 (ZeRO-3 saves its gathered 16-bit weights): save the
        # optimizer's fp32 master weights instead, gathered on every process, written by the main one
        state = _deepspeed_fp32_state_dict(trainer)
        if acc.is_main_process:
            acc.unwrap_model(trainer.model).save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    else:
        trainer.save_model(str(tmp))
    if acc.is_main_process:
        tokenizer.save_pretrained(tmp)
        for junk in ("training_args.bin",):  # a pickle: never shipped beside the safetensors
            (tmp / junk).unlink(missing_ok=True)
        with atomic_dir(dest) as final:
            for item in tmp.iterdir():
                item.rename(final / item.name)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()


def _deepspeed_fp32_state_dict(trainer) -> dict[str, torch.Tensor]:
    """The full fp32 master weights of a DeepSpeed-trained model (ZeRO 1-3) on the main process's CPU (an empty dict
    on the others); a collective: every process calls it, one parameter at a time, so that no process but the main
    one ever holds more than one full parameter."""
    # DeepSpeed is optional (the GPU extra, zero2/zero3 configs only): imported only in a DeepSpeed training
    from deepspeed.utils import safe_get_full_fp32_param

    model = trainer.accelerator.unwrap_model(trainer.model)
    main = trainer.accelerator.is_main_process
    state = {}
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:  # a parameter the optimizer does not hold (frozen): its own values
            full = param.detach().float()
        if main:
            state[name] = full.detach().cpu().float()
        del full
    return state

