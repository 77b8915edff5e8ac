"""DPO-L + SFT (TokenSqueeze §3.3): a length-aware DPO objective mixed with SFT, on TRL 1.16's DPOTrainer.

    L_DPO-L = −log σ( β·Δ + s·λ·log(ℓ(y_l)/ℓ(y_w)) ),   L = η·L_DPO-L + (1 − η)·L_SFT

Δ is the usual DPO log-ratio difference (sums over completion tokens), ℓ the completion token counts read
from the batch's completion masks, L_SFT the per-token mean NLL of the chosen completions.

Sign semantics of s (`length_margin_sign`), for a pair whose chosen response is shorter (ℓ_w < ℓ_l, so
log(ℓ_l/ℓ_w) > 0):
- s = −1: the length gap is a *required margin*. The policy must reach β·Δ > λ·log(ℓ_l/ℓ_w) before the pair
  stops pulling, so the loss is higher and the push towards the shorter response stronger, the more so the
  larger the gap. Equivalently the implicit reward is β·log(π/π_ref) + λ·log ℓ(y), whose optimal policy is
  π* ∝ π_ref·exp(r/β)·ℓ(y)^(−λ/β): a length penalty.
- s = +1: the length gap is a *head start*. The pair's loss is already lower at Δ = 0 and its gradient
  weight σ(−β·Δ − m) smaller; the optimal policy carries ℓ(y)^(+λ/β).
At Δ = 0 (policy = reference, λ = 1) a pair's loss is log((ℓ_w + ℓ_l)/ℓ_l) with s = +1 and
log((ℓ_w + ℓ_l)/ℓ_w) with s = −1.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from .config import TrainingConfig

# Batch keys the collator adds that the model's forward must not receive
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class NonFiniteLossError(RuntimeError):
    """The DPO-L + SFT loss became NaN or infinite; training stops instead of skipping the step."""

    def __init__(self, step: int, mode: str, details: dict[str, Any]):
        self.step = step
        self.mode = mode
        self.details = details
        parts = ", ".join(f"{k}={v}" for k, v in details.items())
        super().__init__(
            f"non-finite DPO-L+SFT loss at {mode} step {step} ({parts}); training was stopped rather than "
            "skipping the step. Check the learning rate, bf16 overflow and the inputs of this step."
        )


@dataclass
class DPOLConfig(DPOConfig):
    """DPOConfig plus the DPO-L + SFT knobs λ (length_lambda), η (sft_eta) and s (length_margin_sign)."""

    # β, pinned here because PAPER.md chooses 0.1 (the LLaMA-Factory default), whatever TRL's default becomes
    beta: float = field(default=0.1, metadata={"help": "β: deviation from the reference model."})
    length_lambda: float = field(default=1.0, metadata={"help": "λ: weight of the length margin log(ℓ_l/ℓ_w)."})
    sft_eta: float = field(default=0.5, metadata={"help": "η: L = η·L_DPO-L + (1 − η)·L_SFT."})
    length_margin_sign: int = field(default=-1, metadata={"help": "s ∈ {+1, −1}: sign of the length margin."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.length_margin_sign, bool) or self.length_margin_sign not in (1, -1):
            raise ValueError(f"length_margin_sign must be +1 or -1, got {self.length_margin_sign!r}")
        if not (math.isfinite(self.length_lambda) and self.length_lambda >= 0):
            raise ValueError(f"length_lambda (λ) must be a finite number >= 0, got {self.length_lambda!r}")
        if not 0.0 <= self.sft_eta <= 1.0:
            raise ValueError(f"sft_eta (η) must lie in [0, 1], got {self.sft_eta!r}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta (β) must be a finite number > 0, got {self.beta!r}")
        # DPOLTrainer computes its own objective; TRL options that would change it are refused, not ignored.
        if list(self.loss_type) != ["sigmoid"] or self.loss_weights is not None:
            raise ValueError(
                "DPOLConfig defines the loss itself (η·DPO-L + (1−η)·SFT): leave loss_type=['sigmoid'] and "
                f"loss_weights=None, got loss_type={self.loss_type!r}, loss_weights={self.loss_weights!r}"
            )
        unsupported = {
            "ld_alpha": (self.ld_alpha, None),
            "f_divergence_type": (self.f_divergence_type, "reverse_kl"),
            "use_weighting": (self.use_weighting, False),
        }
        for name, (value, default) in unsupported.items():
            if value != default:
                raise ValueError(f"DPOLConfig does not support {name}={value!r} (only {default!r})")


def length_margin(chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, length_lambda: float,
                  sign: int) -> torch.Tensor:
    """The DPO-L length term s·λ·log(ℓ(y_l)/ℓ(y_w)) per pair."""
    return sign * length_lambda * (torch.log(rejected_lengths.float()) - torch.log(chosen_lengths.float()))


def dpo_l_pair_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                      ref_rejected_logps: torch.Tensor, margin: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair L_DPO-L = −log σ(β·Δ + margin) from sequence log-probs (sums over completion tokens)."""
    delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * delta + margin)


# Per-position outputs of TRL's fused LM head (the log-probs of the labels, 0 where a label is -100, and the
# statistics DPOLTrainer logs)
_PER_POSITION = ("log_probs", "entropy", "mean_logits", "is_top1")


def split_forward(model, model_kwargs: dict[str, Any], labels: torch.Tensor, width: int) -> SimpleNamespace:
    """Forward a [chosen; rejected] batch as two halves, each cut after its own last real token; per-position
    outputs come back aligned with the shifted labels, [2B, width], zero (False) past each half's end."""
    # The collator pads both halves to one width: a chosen half padded to the longer rejected responses' length
    # spends most of its forward on padding (on the toy profile, about a third of a training step's time).
    mask = model_kwargs["attention_mask"]
    rows_all = mask.size(0)
    n = rows_all // 2
    parts: list[tuple[Any, int]] = []
    for rows in (slice(0, n), slice(n, rows_all)):
        real = mask[rows].any(dim=0).nonzero()
        cut = max(2, int(real.max()) + 1) if len(real) else 2
        kw = {k: (v[rows, :cut] if torch.is_tensor(v) and v.dim() == 2 and v.size(0) == rows_all else v)
              for k, v in model_kwargs.items()}
        parts.append((model(**kw, labels=labels[rows, :cut], fused_lm_head=True), cut - 1))
    merged = {}
    for name in _PER_POSITION:
        values = [getattr(out, name, None) for out, _ in parts]
        if any(v is None for v in values):
            continue
        # keep the last (cut - 1) positions (prompt-learning PEFT prepends virtual tokens), pad to width on the right
        merged[name] = torch.cat([F.pad(v[:, v.size(1) - k:], (0, width - k)) for v, (_, k) in zip(values, parts)])
    return SimpleNamespace(**merged)


class DPOLTrainer(DPOTrainer):
    """DPOTrainer whose loss is η·L_DPO-L + (1 − η)·L_SFT; stops with NonFiniteLossError on a NaN/inf loss."""

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(training_args, DPOLConfig):
            raise TypeError(f"DPOLTrainer needs args=DPOLConfig(...), got {type(training_args).__name__}")
        super().__init__(*args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("DPOLTrainer does not add the MoE router auxiliary loss; set router_aux_loss_coef=0.0")

    def _reference_logps(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference sequence log-probs of the chosen and rejected halves: precomputed, or from the reference."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if self.ref_model is not None:
            # a separate frozen reference: the same two-half forward as the policy's, without gradients
            shift_mask = inputs["completion_mask"][:, 1:]
            model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            model_kwargs["use_cache"] = False
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            with torch.no_grad():
                out = split_forward(self.ref_model, model_kwargs, labels, shift_mask.size(1))
            return (out.log_probs * shift_mask).sum(dim=1).chunk(2, dim=0)
        # TRL's public per-batch helper: no_grad, adapter switching for PEFT, gradient checkpointing off
        return self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else self.model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """η·L_DPO-L + (1 − η)·L_SFT on a [chosen; rejected] batch from DataCollatorForPreference."""
        mode = "train" if self.model.training else "eval"
        args: DPOLConfig = self.args
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:]
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = split_forward(model, model_kwargs, labels, shift_mask.size(1))
        per_token_logps = outputs.log_probs * shift_mask
        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(inputs)

        # ℓ: completion tokens in the (possibly truncated) sequence, EOS included, prompt and padding excluded
        chosen_len, rejected_len = completion_mask.sum(dim=1).chunk(2, dim=0)
        margin = length_margin(chosen_len, rejected_len, args.length_lambda, args.length_margin_sign)
        dpo_l = dpo_l_pair_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, margin,
                                  self.beta).mean()
        # Same normalisation as TRL's "sft" loss type: the mean NLL over all chosen completion tokens of the
        # micro-batch (token-weighted, not a mean of per-sequence means)
        chosen_mask = shift_mask.chunk(2, dim=0)[0].bool()
        sft = -per_token_logps.chunk(2, dim=0)[0][chosen_mask].mean()
        # A term with weight 0 is left out so that η = 1 (or 0) matches TRL exactly even where the other is inf
        loss = 0.0
        if args.sft_eta > 0:
            loss = loss + args.sft_eta * dpo_l
        if args.sft_eta < 1:
            loss = loss + (1.0 - args.sft_eta) * sft

        self._check_finite(loss, dpo_l, sft, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                           margin, mode)
        self._log_metrics(mode, inputs, outputs, shift_mask, chosen_logps, rejected_logps, ref_chosen_logps,
                          ref_rejected_logps, margin, chosen_len, rejected_len, dpo_l, sft)
        if return_outputs:
            # Trainer.prediction_step asks for outputs when prediction_loss_only is off; the fused head builds no
            # logits, so they are recomputed (as TRL does)
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _check_finite(self, loss, dpo_l, sft, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      margin, mode: str) -> None:
        """Raise NonFiniteLossError when the loss of this step is NaN or infinite (on any process)."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        # Every process must raise together, or the others would hang in the next collective
        if self.accelerator.gather(finite).min() > 0:
            return
        step = self.state.global_step + 1 if mode == "train" else self.state.global_step

        def _fin(t: torch.Tensor) -> bool:
            return bool(torch.isfinite(t.detach()).all())

        raise NonFiniteLossError(step, mode, {
            "loss": float(loss.detach()),
            "dpo_l_loss": float(dpo_l.detach()),
            "sft_loss": float(sft.detach()),
            "policy_logps_finite": _fin(chosen_logps) and _fin(rejected_logps),
            "ref_logps_finite": _fin(ref_chosen_logps) and _fin(ref_rejected_logps),
            "length_margin_finite": _fin(margin),
        })

    def _log_metrics(self, mode, inputs, outputs, shift_mask, chosen_logps, rejected_logps, ref_chosen_logps,
                     ref_rejected_logps, margin, chosen_len, rejected_len, dpo_l, sft) -> None:
        """Record TRL's standard DPO metrics plus length_margin, dpo_l_loss, sft_loss and completion lengths."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        seq_len = shift_mask.size(1)
        mask = shift_mask.bool()
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)

        def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
            num, den = acc.gather_for_metrics(num.detach()).sum(), acc.gather_for_metrics(den).sum()
            return (num / den).item() if den > 0 else 0.0

        metrics["entropy"].append(_ratio((outputs.entropy[:, -seq_len:] * mask).sum(), mask.sum()))
        if mode == "train":
            n_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
        metrics["logits/chosen"].append(_ratio(chosen_logits[chosen_mask].sum(), chosen_mask.sum()))
        metrics["logits/rejected"].append(_ratio(rejected_logits[rejected_mask].sum(), rejected_mask.sum()))
        chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
        metrics["mean_token_accuracy"].append(_ratio((chosen_top1 & chosen_mask).sum(), chosen_mask.sum()))

        # Rewards are TRL's (β·log-ratio, no length term), so they compare with plain DPO runs
        chosen_rewards = acc.gather(self.beta * (chosen_logps - ref_chosen_logps).detach())
        rejected_rewards = acc.gather(self.beta * (rejected_logps - ref_rejected_logps).detach())
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())

        metrics["length_margin"].append(acc.gather(margin.detach()).mean().item())
        metrics["length/chosen"].append(acc.gather(chosen_len.float()).mean().item())
        metrics["length/rejected"].append(acc.gather(rejected_len.float()).mean().item())
        metrics["dpo_l_loss"].append(acc.gather(dpo_l.detach().reshape(1)).mean().item())
        metrics["sft_loss"].append(acc.gather(sft.detach().reshape(1)).mean().item())


def _special_tokens_added(tokenizer) -> tuple[bool, bool]:
    """Whether encoding with the default add_special_tokens=True prepends BOS / appends EOS."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    special = tokenizer(probe)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and special[:1] == [bos] and plain[:1] != [bos]
    adds_eos = eos is not None and special[-1:] == [eos] and plain[-1:] != [eos]
    return adds_bos, adds_eos


def pairs_to_dataset(pairs: pd.DataFrame, tokenizer) -> Dataset:
    """The preference dataset (prompt, chosen, rejected as plain text) TRL tokenizes, from a pairs table."""
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs table lacks column(s) {missing}; it has {list(pairs.columns)}")
    if len(pairs) == 0:
        raise ValueError("pairs table is empty: there is nothing to train on")
    for col in PAIR_COLUMNS:
        bad = pairs.index[~pairs[col].map(lambda v: isinstance(v, str) and len(v) > 0)]
        if len(bad):
            raise ValueError(f"pairs column {col!r} must hold non-empty strings; bad rows: {list(bad[:5])}")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: TRL appends it to every completion")
    adds_bos, adds_eos = _special_tokens_added(tokenizer)
    if adds_eos:
        raise ValueError("the tokenizer appends EOS on every encode; TRL would then end completions with two EOS")
    prompts = pairs["prompt"].tolist()
    if adds_bos:
        # TRL encodes plain-text prompts with add_special_tokens=True; a chat-formatted prompt already starts with
        # the BOS text, so strip it to keep a single BOS (the sequence generation sees with add_special_tokens=False)
        bos = tokenizer.bos_token
        if not all(p.startswith(bos) for p in prompts):
            warnings.warn("the tokenizer prepends BOS but some prompts do not start with it: training sees a BOS "
                          "that generation with add_special_tokens=False does not", stacklevel=2)
        prompts = [p[len(bos):] if p.startswith(bos) else p for p in prompts]
    return Dataset.from_dict({"prompt": prompts, "chosen": pairs["chosen"].tolist(),
                              "rejected": pairs["rejected"].tolist()})


def _check_prepared(dataset: Dataset, tokenizer, max_length: int, name: str) -> None:
    """Check TRL's tokenized pairs end with the EOS id; warn about pairs that max_length truncates."""
    eos = tokenizer.eos_token_id
    first = dataset[0]
    if first["chosen_ids"][-1:] != [eos] or first["rejected_ids"][-1:] != [eos]:
        raise ValueError(f"the EOS text {tokenizer.eos_token!r} does not tokenize to the EOS id {eos}; "
                         "TRL appends it as text, so it must be a special (added) token")
    n_long = 0
    for batch in dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).iter(batch_size=512):
        n_long += sum(len(p) + max(len(c), len(r)) > max_length
                      for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]))
    if n_long:
        warnings.warn(f"{n_long} of {len(dataset)} {name} pairs exceed max_length={max_length} tokens and are "
                      "truncated: their losses and length margins use the truncated completions", stacklevel=3)


def _shorter_than_an_epoch(cfg: TrainingConfig, max_steps: int | None, n_pairs: int) -> bool:
    """True when max_steps optimizer steps visit fewer pairs than the dataset holds."""
    return bool(max_steps) and max_steps > 0 and max_steps * cfg.batch_size * cfg.grad_accum < n_pairs


def make_dpo_l_trainer(model, ref_model, tokenizer, pairs: pd.DataFrame, cfg: TrainingConfig, output_dir: str,
                       seed: int, max_steps: int | None = None, *, eval_pairs: pd.DataFrame | None = None,
                       device: str = "auto", precompute_ref_log_probs: bool | None = None,
                       callbacks: list | None = None, **config_overrides: Any) -> DPOLTrainer:
    """A DPOLTrainer set up from a pairs table and the profile's TrainingConfig (reference = initial model if None)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        # transformers 5 has no warmup_ratio: warmup_steps < 1 is a ratio and >= 1 a step count
        raise ValueError(f"warmup_ratio must lie in [0, 1), got {cfg.warmup_ratio}")
    if precompute_ref_log_probs is None:
        # Without a reference model, the reference is the initial policy. Scoring the whole dataset once before
        # training saves a second copy of the model, and costs less than a reference forward per step as soon as
        # the run visits every pair at least once; a run shorter than an epoch (an ablation row's max_steps)
        # scores only the pairs it visits, on the fly, with a frozen copy of the initial model.
        precompute_ref_log_probs = ref_model is None and not _shorter_than_an_epoch(cfg, max_steps, len(pairs))
        if ref_model is None and not precompute_ref_log_probs:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if ref_model is None and not precompute_ref_log_probs:
        raise ValueError("with ref_model=None the reference log-probs must be precomputed "
                         "(precompute_ref_log_probs=True); pass a reference model otherwise")
    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        beta=cfg.beta, length_lambda=cfg.lam, sft_eta=cfg.eta, length_margin_sign=cfg.length_margin_sign,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=-1 if max_steps is None else max_steps,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, warmup_steps=cfg.warmup_ratio, max_length=cfg.max_length,
        # activation_checkpointing is transformers 5's name for gradient_checkpointing (the old one warns)
        bf16=cfg.bf16, activation_checkpointing=cfg.gradient_checkpointing,
        seed=seed, data_seed=seed, precompute_ref_log_probs=precompute_ref_log_probs,
        report_to="none", save_strategy="no", logging_strategy="steps", logging_steps=1,
        logging_nan_inf_filter=False, prediction_loss_only=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, use_cpu=device == "cpu",
    )
    settings.update(config_overrides)
    args = DPOLConfig(**settings)
    trainer = DPOLTrainer(
        model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
        train_dataset=pairs_to_dataset(pairs, tokenizer),
        eval_dataset=None if eval_pairs is None else pairs_to_dataset(eval_pairs, tokenizer),
        callbacks=callbacks,
    )
    _check_prepared(trainer.train_dataset, tokenizer, cfg.max_length, "train")
    if trainer.eval_dataset is not None:
        _check_prepared(trainer.eval_dataset, tokenizer, cfg.max_length, "eval")
    return trainer


def training_log(trainer: DPOTrainer) -> pd.DataFrame:
    """The per-step training logs (one row per logged step) from trainer.state.log_history."""
    rows = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return pd.DataFrame(rows).set_index("step") if rows else pd.DataFrame()


def train_and_save(model, tokenizer, pairs: pd.DataFrame, cfg: TrainingConfig, stage_dir, seed: int, device: str = "cpu",
                   max_steps: int | None = None, model_subdir: str = "model") -> pd.DataFrame:
    """Train DPO-L + SFT on a pairs table, save the model (safetensors) atomically, and return the per-step log."""
    import shutil
    from pathlib import Path

    from .artifacts import atomic_dir

    stage_dir = Path(stage_dir)
    scratch = stage_dir / ".trainer"
    trainer = make_dpo_l_trainer(model, None, tokenizer, pairs, cfg, output_dir=str(scratch), seed=seed,
                                 max_steps=max_steps, device=device)
    trainer.train()
    log = training_log(trainer)
    with atomic_dir(stage_dir / model_subdir) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(scratch, ignore_errors=True)
    return log
