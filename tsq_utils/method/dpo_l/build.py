"""A DPO-L trainer from a pairs table and the profile's TrainingConfig: its DPOLConfig (training_args), the trainer
(make_dpo_l_trainer), the reference scored once (reference_log_probs) and the precision and batch arithmetic."""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from trl import DPOTrainer

from ...core.config import TrainingConfig
from ...model import compat
from .data import _check_prepared, pairs_to_dataset
from .loss import DPOLConfig
from .trainer import DPOLTrainer


@dataclass(frozen=True)
class TrainRun:
    """How one training runs, beyond the profile's TrainingConfig: its seed, device, length and reference cache."""

    seed: int = 0
    device: str = "auto"  # "auto", "cpu" or "cuda"
    max_steps: int | None = None  # optimizer steps; None: training.epochs passes over the pairs
    ref_cache: str | None = None  # a folder of reference log-probs shared by trainings of the same base model
    progress: bool = True  # False: no progress bar and no per-step log lines (the ablation rows)


@dataclass(frozen=True)
class TrainerOptions:
    """The optional parts of a trainer's setup: evaluation pairs, callbacks, a prebuilt DPOLConfig, the reference
    strategy and DPOConfig fields to override."""

    eval_pairs: pd.DataFrame | None = None
    callbacks: Sequence | None = None
    args: DPOLConfig | None = None  # built by training_args before the model was loaded; None: built here
    precompute_ref_log_probs: bool | None = None  # None: decided by training_args (see there)
    overrides: Mapping[str, Any] = field(default_factory=dict)  # DPOConfig fields set last


def reference_log_probs(model, tokenizer, pairs: pd.DataFrame, cfg: TrainingConfig, cache_dir,
                        device: str = "auto") -> pd.DataFrame:
    """Score the reference (the untrained base model) on a pairs table once and store the result in cache_dir;
    every later training of at least an epoch of this base model on these pairs with ref_cache=cache_dir
    (train_and_save, make_dpo_l_trainer) reads it instead of scoring again (shorter trainings use the batch cache,
    see training_args). Returns ref_chosen_logps, ref_rejected_logps per pair (the table's order, minus any pair
    TRL drops because its prompt alone fills max_length). Call it on the freshly loaded base model."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_dpo_l_trainer(model, None, tokenizer, pairs, cfg, tmp,
                                     TrainRun(seed=0, device=device, ref_cache=str(cache_dir)),
                                     TrainerOptions(overrides={"disable_tqdm": True}))
        ds = trainer.train_dataset
        out = pd.DataFrame({"ref_chosen_logps": ds["ref_chosen_logps"], "ref_rejected_logps": ds["ref_rejected_logps"]})
    return out


def master_weights_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Cast a model's low-precision floating weights to float32 in place, for bf16 mixed-precision training without
    DeepSpeed (one process, DDP, FSDP2).

    bf16 weights cannot hold an AdamW update at the paper's rate: at lr 5e-6 a step is ~2^-17 of a weight and bf16
    keeps 8 mantissa bits, so most updates round away (tests/test_dpo_l.py: after 4 such steps under half of the
    bf16 weights had moved, and over 95% of the fp32 ones).
    The trainer's bf16 flag then runs forward and backward under bf16 autocast over these fp32 weights, and the
    model is saved in fp32. Under DeepSpeed (zero2/zero3) it is not used: DeepSpeed's bf16 section holds the model in
    bf16 and keeps the fp32 master weights in its optimizer (gradients accumulate in fp32 per ds_zero*.json).
    """
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model.to(torch.float32)
    return model


def global_batch(cfg: TrainingConfig) -> int:
    """Pairs per optimizer step: per-device batch x gradient accumulation x processes (the paper: 128)."""
    return cfg.batch_size * cfg.grad_accum * num_processes(cfg)


def num_processes(cfg: TrainingConfig) -> int:
    """Training processes (one per GPU) the profile asks for; 1 trains in this process."""
    return int(cfg.num_processes)


def _shorter_than_an_epoch(cfg: TrainingConfig, max_steps: int | None, n_pairs: int) -> bool:
    """True when max_steps optimizer steps visit fewer pairs than the dataset holds (global batch: all processes)."""
    return bool(max_steps) and max_steps > 0 and max_steps * global_batch(cfg) < n_pairs


def deepspeed_enabled() -> bool:
    """True in a process that `accelerate launch` started with a DeepSpeed config (configs/accelerate/zero*.yaml)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def training_args(cfg: TrainingConfig, output_dir: str, run: TrainRun, n_pairs: int | None = None,
                  has_ref_model: bool = False, options: TrainerOptions | None = None) -> DPOLConfig:
    """The DPOLConfig of a training, built before the model is loaded.

    Under DeepSpeed (accelerate launch with configs/accelerate/zero*.yaml) building it registers DeepSpeed's config
    with transformers, so that a from_pretrained called afterwards builds the model under ZeRO-3's zero.Init:
    each rank then holds only its shard of the weights instead of a whole fp32 copy in host RAM
    (tsq_utils.method.train_entry loads the model after calling this).

    Reference strategy (options.precompute_ref_log_probs None): without a reference model the reference is the initial
    policy, and its log-probs are precomputed once over the dataset (no second model in memory) when the run visits
    every pair at least once (max_steps x batch_size x grad_accum x num_processes >= n_pairs); a run shorter than an
    epoch scores the batches it visits on the fly with a frozen copy. With a run.ref_cache folder either result is
    stored and reused by later trainings of the same base weights: the whole dataset's log-probs (keyed by the weights
    and the tokenized pairs), or each batch's (keyed by the weights and the batch's token ids). The decision per
    profile and its memory arithmetic: benchmarks/bench_memory.py part 3.
    """
    options = TrainerOptions() if options is None else options
    seed, max_steps, device = run.seed, run.max_steps, run.device
    precompute_ref_log_probs = options.precompute_ref_log_probs
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        # transformers 5 has no warmup_ratio: warmup_steps < 1 is a ratio and >= 1 a step count
        raise ValueError(f"warmup_ratio must lie in [0, 1), got {cfg.warmup_ratio}")
    if precompute_ref_log_probs is None:
        precompute_ref_log_probs = not has_ref_model and (
            n_pairs is None or not _shorter_than_an_epoch(cfg, max_steps, n_pairs))
    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        beta=cfg.beta, length_lambda=cfg.lam, sft_eta=cfg.eta, length_margin_sign=cfg.length_margin_sign,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=-1 if max_steps is None else max_steps,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, warmup_steps=cfg.warmup_ratio, max_length=cfg.max_length,
        # bf16 mixed precision. Without DeepSpeed: bf16 autocast over fp32 weights (master_weights_fp32). Under
        # DeepSpeed: its bf16 section holds the model in bf16, keeps fp32 master weights in the optimizer and (our
        # configs/accelerate/ds_zero*.json) accumulates gradients in fp32.
        bf16=cfg.bf16, **compat.checkpointing_kwargs(cfg.gradient_checkpointing, DPOLConfig),
        seed=seed, data_seed=seed, precompute_ref_log_probs=precompute_ref_log_probs,
        report_to="none", save_strategy="no", logging_strategy="steps", logging_steps=1,
        logging_nan_inf_filter=False, prediction_loss_only=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, use_cpu=device == "cpu",
        # every parameter gets a gradient in every step (full fine-tuning), so DDP need not search the graph for
        # unused ones after each forward (transformers turns the search on when gradient checkpointing is off)
        ddp_find_unused_parameters=False,
    )
    settings.update(options.overrides)
    return DPOLConfig(**settings)


def make_dpo_l_trainer(model, ref_model, tokenizer, pairs: pd.DataFrame, cfg: TrainingConfig, output_dir: str,
                       run: TrainRun, options: TrainerOptions | None = None) -> DPOLTrainer:
    """A DPOLTrainer set up from a pairs table and the profile's TrainingConfig (reference = initial model if None).

    options.args: a DPOLConfig from training_args (built before the model was loaded); otherwise built here.
    run.ref_cache: a folder of reference log-probs shared by trainings of the same base model (see training_args): a
    training that finds its dataset's, or its batches', reference log-probs there does not compute them again."""
    options = TrainerOptions() if options is None else options
    args = options.args
    if args is None:
        args = training_args(cfg, output_dir, run, n_pairs=len(pairs), has_ref_model=ref_model is not None,
                             options=options)
    if ref_model is None and not args.precompute_ref_log_probs:
        if options.precompute_ref_log_probs is False:
            raise ValueError("with ref_model=None the reference log-probs must be precomputed "
                             "(precompute_ref_log_probs=True); pass a reference model otherwise")
        # a run shorter than an epoch: a frozen copy of the initial model scores the pairs it visits
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if args.bf16 and not deepspeed_enabled():
        master_weights_fp32(model)
    trainer = DPOLTrainer(
        model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
        train_dataset=pairs_to_dataset(pairs, tokenizer),
        eval_dataset=None if options.eval_pairs is None else pairs_to_dataset(options.eval_pairs, tokenizer),
        callbacks=None if options.callbacks is None else list(options.callbacks), ref_cache=run.ref_cache,
    )
    _check_prepared(trainer.train_dataset, tokenizer, cfg.max_length, "train")
    if trainer.eval_dataset is not None:
        _check_prepared(trainer.eval_dataset, tokenizer, cfg.max_length, "eval")
    return trainer


def training_log(trainer: DPOTrainer) -> pd.DataFrame:
    """The per-step training logs (one row per logged step) from trainer.state.log_history."""
    rows = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return pd.DataFrame(rows).set_index("step") if rows else pd.DataFrame()
