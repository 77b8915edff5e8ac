"""The DPO-L + SFT objective (TokenSqueeze §3.3): its config (DPOLConfig), the per-pair loss and the forward.

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

DPOLTrainer (trainer.py) computes it on each batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from trl import DPOConfig


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

    # β, pinned here because docs/method.md chooses 0.1 (the LLaMA-Factory default), whatever TRL's default becomes
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


# Rows per forward in split_forward: a batch's sequences, sorted by length, go through the model this many at a
# time, each group cut after its own longest sequence. Random batches of toy pairs pad about 40% of each half;
# groups of 4 similar lengths pad little and keep the matmuls large (benchmarks/bench_training.py, part "split").
ROWS_PER_FORWARD = 4


def split_forward(model, model_kwargs: dict[str, Any], labels: torch.Tensor, width: int,
                  rows_per_forward: int | None = None) -> SimpleNamespace:
    """Forward a right-padded [chosen; rejected] batch in groups of rows of similar length, each cut after its own
    last real token; per-position outputs come back in the batch's row order, aligned with the shifted labels,
    [2B, width], zero (False) past each row's group's end. rows_per_forward 0: the two halves as they are."""
    # The collator pads both halves to one width, and each half to its longest sequence: the short chosen
    # responses and the shorter rejected ones would spend much of the forward (and backward) on padding. Every
    # row's log-probs depend on its own tokens only (causal attention, padding masked), so grouping changes
    # which rows share a matmul, not what is computed (up to float rounding).
    mask = model_kwargs["attention_mask"]
    rows_all = mask.size(0)
    g = ROWS_PER_FORWARD if rows_per_forward is None else int(rows_per_forward)
    real_len = [int(x) for x in (mask.flip(1).cumsum(1) > 0).sum(1).tolist()]  # last real position + 1
    if g <= 0:
        n = rows_all // 2
        groups = [list(range(0, n)), list(range(n, rows_all))]
    else:
        order = sorted(range(rows_all), key=lambda i: (real_len[i], i))
        groups = [order[i:i + g] for i in range(0, rows_all, g)]
    parts: list[tuple[Any, int]] = []
    for rows in groups:
        cut = max(2, max(real_len[i] for i in rows))
        idx = torch.tensor(rows, device=mask.device)
        kw = {k: (v.index_select(0, idx)[:, :cut] if torch.is_tensor(v) and v.dim() == 2 and v.size(0) == rows_all
                  else v) for k, v in model_kwargs.items()}
        parts.append((model(**kw, labels=labels.index_select(0, idx)[:, :cut], fused_lm_head=True), cut - 1))
    inverse = torch.empty(rows_all, dtype=torch.long, device=mask.device)
    inverse[torch.tensor([i for rows in groups for i in rows], device=mask.device)] = torch.arange(
        rows_all, device=mask.device)
    merged = {}
    for name in _PER_POSITION:
        values = [getattr(out, name, None) for out, _ in parts]
        if any(v is None for v in values):
            continue
        # keep the last (cut - 1) positions (prompt-learning PEFT prepends virtual tokens), pad to width on the right
        stacked = torch.cat([F.pad(v[:, v.size(1) - k:], (0, width - k)) for v, (_, k) in zip(values, parts)])
        merged[name] = stacked.index_select(0, inverse)
    return SimpleNamespace(**merged)

