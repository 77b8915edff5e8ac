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
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from ..model import compat
from ..core.config import TrainingConfig

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

    # compute_loss returns a per-micro-batch loss that the Trainer divides by the accumulation steps (the SFT term is
    # pre-scaled so that the optimizer step's gradient is that of the token mean over the whole step)
    loss_is_scaled_for_ga = False

    def __init__(self, *args, ref_cache: str | None = None, **kwargs):
        """ref_cache: a folder of reference log-probs reused across trainings (see reference_cache_key)."""
        training_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(training_args, DPOLConfig):
            raise TypeError(f"DPOLTrainer needs args=DPOLConfig(...), got {type(training_args).__name__}")
        # read by _precompute_ref_logps, which DPOTrainer.__init__ calls
        self._ref_cache = ref_cache
        self.ref_cache_hit: bool | None = None
        super().__init__(*args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("DPOLTrainer does not add the MoE router auxiliary loss; set router_aux_loss_coef=0.0")
        # On-the-fly reference with a ref_cache (a run shorter than an epoch): each batch's reference log-probs are
        # stored under its token ids, so another training that draws the very same batch (notebook 06's rows on the
        # same pairs with the same seed: common random numbers) reads them, bit for bit what it would compute.
        self.ref_batch_hits = 0
        self._ref_hash = None
        if ref_cache and not self.precompute_ref_logps and self.ref_model is not None:
            from trl.trainer.utils import hash_module

            self._ref_hash = hash_module(self.accelerator.unwrap_model(self.ref_model))

    def _batch_cache_key(self, inputs: dict[str, torch.Tensor]) -> str | None:
        """The batch cache's key of a [chosen; rejected] batch (None without a ref_cache)."""
        if self._ref_hash is None:
            return None
        import hashlib

        h = hashlib.sha256(f"{_REF_CACHE_VERSION}|{self._ref_hash}|{self.args.bf16}|"
                           f"{inputs['input_ids'].device.type}".encode())
        for name in ("input_ids", "attention_mask", "completion_mask"):
            t = inputs[name].detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def _get_num_items_in_batch(self, batch_samples: list, device) -> torch.Tensor | None:
        """Chosen completion tokens of the whole optimizer step: every micro-batch, every process (the SFT term's
        denominator, so that L_SFT is the same token mean whatever batch_size x grad_accum x processes)."""
        if not batch_samples or "completion_mask" not in batch_samples[0]:
            return None
        n = sum(int(b["completion_mask"][: b["completion_mask"].size(0) // 2, 1:].sum()) for b in batch_samples)
        total = torch.tensor([n], dtype=torch.long, device=device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return total.reshape(())

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """The reference log-probs of every pair, added as columns in memory on every process (TRL's version writes
        an Arrow cache file into a per-process temporary folder that the other ranks cannot read). Scored once, in
        batches of similar lengths split over the processes, or read from ref_cache when the same base weights
        scored the same tokenized pairs before."""
        key = self._ref_cache_key(dataset)
        cached = load_cached_ref_logps(self._ref_cache, key, len(dataset)) if self._ref_cache else None
        self.ref_cache_hit = cached is not None if self._ref_cache else None
        if cached is None:
            cached = self._score_reference(dataset, batch_size)
            if self._ref_cache and self.accelerator.is_main_process:
                save_cached_ref_logps(self._ref_cache, key, *cached)
            self.accelerator.wait_for_everyone()
        chosen, rejected = cached
        return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column(
            "ref_rejected_logps", rejected.tolist())

    def _ref_cache_key(self, dataset: Dataset) -> str:
        """reference_cache_key of the reference weights and this dataset's token ids, as rank 0 computes it."""
        from accelerate.utils import broadcast_object_list

        key = [None]
        if self.accelerator.is_main_process:
            key = [reference_cache_key(self._precompute_model_hash, dataset, self.args)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(key, from_process=0)
        return key[0]

    @torch.no_grad()
    def _score_reference(self, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probs of every pair under the reference (the initial policy when there is no ref_model)."""
        from trl.models import prepare_deepspeed
        from trl.models.utils import disable_gradient_checkpointing

        acc = self.accelerator
        n = len(dataset)
        ids = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(ids["prompt_ids"], ids["chosen_ids"],
                                                                     ids["rejected_ids"])]
        # longest first, so that each batch pads little; batches dealt round-robin to the processes, and every
        # process runs the same number of forwards (ZeRO-3 gathers the weights collectively)
        order = sorted(range(n), key=lambda i: (-lengths[i], i))
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        world, rank = acc.num_processes, acc.process_index
        per_rank = -(-len(batches) // world)
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, acc)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        was_training = model.training
        model.eval()
        chosen = torch.zeros(n, dtype=torch.float32, device=acc.device)
        rejected = torch.zeros(n, dtype=torch.float32, device=acc.device)
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), acc.autocast():
            for j in range(per_rank):
                k = j * world + rank
                rows = batches[min(k, len(batches) - 1)]
                batch = self.data_collator([{c: ids[c][i] for c in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                            for i in rows])
                batch = {k2: v.to(acc.device) if torch.is_tensor(v) else v for k2, v in batch.items()}
                shift_mask = batch["completion_mask"][:, 1:]
                model_kwargs = {k2: v for k2, v in batch.items() if k2 not in _NON_MODEL_KEYS}
                model_kwargs["use_cache"] = False
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                out = split_forward(model, model_kwargs, labels, shift_mask.size(1))
                c, r = (out.log_probs * shift_mask).sum(dim=1).float().chunk(2, dim=0)
                if k < len(batches):  # a process without a batch of its own repeats the last one, unused
                    idx = torch.tensor(rows, device=acc.device)
                    chosen[idx], rejected[idx] = c, r
        model.train(was_training)
        if world > 1:  # each pair was scored on exactly one process, the others hold 0: a sum gathers them exactly
            chosen, rejected = acc.reduce(chosen, reduction="sum"), acc.reduce(rejected, reduction="sum")
        return chosen.cpu(), rejected.cpu()

    def _reference_logps(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference sequence log-probs of the chosen and rejected halves: precomputed, or from the reference."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if self.ref_model is not None:
            # a separate frozen reference: the same two-half forward as the policy's, without gradients
            key = self._batch_cache_key(inputs)
            if key is not None:
                hit = load_cached_ref_logps(Path(self._ref_cache) / "batches", key, inputs["input_ids"].size(0) // 2)
                if hit is not None:
                    self.ref_batch_hits += 1
                    return hit[0].to(inputs["input_ids"].device), hit[1].to(inputs["input_ids"].device)
            shift_mask = inputs["completion_mask"][:, 1:]
            model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            model_kwargs["use_cache"] = False
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            with torch.no_grad():
                out = split_forward(self.ref_model, model_kwargs, labels, shift_mask.size(1))
            chosen, rejected = (out.log_probs * shift_mask).sum(dim=1).chunk(2, dim=0)
            if key is not None:
                save_cached_ref_logps(Path(self._ref_cache) / "batches", key, chosen.detach().cpu(),
                                      rejected.detach().cpu())
            return chosen, rejected
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
        # L_SFT is the mean NLL over every chosen completion token of the optimizer step (token-weighted, not a mean
        # of per-sequence or per-micro-batch means), whatever batch_size x grad_accum x processes: in training the
        # micro-batch's NLL sum is divided by the step's token count (num_items_in_batch, all micro-batches and
        # processes) and multiplied by the micro-batches x processes that the Trainer's division by the
        # accumulation steps and the processes' gradient averaging then divide out. Evaluation: the batch's mean.
        chosen_mask = shift_mask.chunk(2, dim=0)[0].bool()
        chosen_nll = -per_token_logps.chunk(2, dim=0)[0][chosen_mask]
        if num_items_in_batch is not None and mode == "train":
            scale = self.current_gradient_accumulation_steps * self.accelerator.num_processes
            sft = chosen_nll.sum() * scale / num_items_in_batch.to(chosen_nll.device).clamp(min=1)
        else:
            sft = chosen_nll.mean()
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


# Bump when the reference scoring changes what it computes: cached log-probs of older code are then not reused
_REF_CACHE_VERSION = "1"


def reference_cache_key(model_hash: str, dataset: Dataset, args: DPOConfig) -> str:
    """What reference log-probs depend on: the reference weights (TRL's hash_module: every tensor's dtype and bytes),
    the tokenized pairs (prompt, chosen and rejected token ids, in order), the truncation (max_length and mode), the
    compute precision and device type, and the scoring code's version. Two trainings with equal keys (notebook 06's
    rows on the same pairs with other seeds or objectives, a rerun of notebook 04) share one scoring pass."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([_REF_CACHE_VERSION, model_hash, args.max_length, args.truncation_mode,
                                   bool(args.bf16), str(args.device.type)]).encode())
    cols = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    for batch in cols.iter(batch_size=1024):
        for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]):
            h.update(json.dumps([p, c, r], separators=(",", ":")).encode())
    return h.hexdigest()


def load_cached_ref_logps(cache_dir, key: str, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (chosen, rejected) reference log-probs under key, or None when absent or of another size."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(cache_dir) / f"{key}.safetensors"
    if not path.is_file():
        return None
    t = load_file(str(path))
    if t["chosen"].numel() != n or t["rejected"].numel() != n:
        return None
    return t["chosen"], t["rejected"]


def save_cached_ref_logps(cache_dir, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Write the reference log-probs under key atomically (a temporary file renamed into place)."""
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    save_file({"chosen": chosen.float().contiguous(), "rejected": rejected.float().contiguous()}, str(tmp))
    os.replace(tmp, cache_dir / f"{key}.safetensors")


def reference_log_probs(model, tokenizer, pairs: pd.DataFrame, cfg: TrainingConfig, cache_dir, *,
                        device: str = "auto") -> pd.DataFrame:
    """Score the reference (the untrained base model) on a pairs table once and store the result in cache_dir;
    every later training of at least an epoch of this base model on these pairs with ref_cache=cache_dir
    (train_and_save, make_dpo_l_trainer) reads it instead of scoring again (shorter trainings use the batch cache,
    see training_args). Returns ref_chosen_logps, ref_rejected_logps per pair (the table's order, minus any pair
    TRL drops because its prompt alone fills max_length). Call it on the freshly loaded base model."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_dpo_l_trainer(model, None, tokenizer, pairs, cfg, tmp, seed=0, device=device,
                                     ref_cache=str(cache_dir), disable_tqdm=True)
        ds = trainer.train_dataset
        out = pd.DataFrame({"ref_chosen_logps": ds["ref_chosen_logps"], "ref_rejected_logps": ds["ref_rejected_logps"]})
    return out


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
    return int(getattr(cfg, "num_processes", 1) or 1)


def checkpoint_settings(cfg: TrainingConfig) -> dict[str, Any]:
    """Trainer checkpointing from training.save_steps: every N optimizer steps (last two kept), or none when 0."""
    every = int(getattr(cfg, "save_steps", 0) or 0)
    if every <= 0:
        return {"save_strategy": "no"}
    # save_only_model=False keeps the optimizer, scheduler and RNG state: a resumed run continues the same run
    return {"save_strategy": "steps", "save_steps": every, "save_total_limit": 2, "save_only_model": False}


def last_checkpoint(output_dir) -> str | None:
    """The newest checkpoint-<step> folder the trainer left in output_dir (None when there is none)."""
    from pathlib import Path

    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


def _shorter_than_an_epoch(cfg: TrainingConfig, max_steps: int | None, n_pairs: int) -> bool:
    """True when max_steps optimizer steps visit fewer pairs than the dataset holds (global batch: all processes)."""
    return bool(max_steps) and max_steps > 0 and max_steps * global_batch(cfg) < n_pairs


def deepspeed_enabled() -> bool:
    """True in a process that `accelerate launch` started with a DeepSpeed config (configs/accelerate/zero*.yaml)."""
    import os

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def training_args(cfg: TrainingConfig, output_dir: str, seed: int, max_steps: int | None = None, *,
                  n_pairs: int | None = None, has_ref_model: bool = False, device: str = "auto",
                  precompute_ref_log_probs: bool | None = None, ref_cache: str | None = None,
                  **config_overrides: Any) -> DPOLConfig:
    """The DPOLConfig of a training, built before the model is loaded.

    Under DeepSpeed (accelerate launch with configs/accelerate/zero*.yaml) building it registers DeepSpeed's config
    with transformers, so that a from_pretrained called afterwards builds the model under ZeRO-3's zero.Init:
    each rank then holds only its shard of the weights instead of a whole fp32 copy in host RAM
    (tsq_utils.method.train_entry loads the model after calling this).

    Reference strategy (precompute_ref_log_probs None): without a reference model the reference is the initial
    policy, and its log-probs are precomputed once over the dataset (no second model in memory) when the run visits
    every pair at least once (max_steps x batch_size x grad_accum x num_processes >= n_pairs); a run shorter than an
    epoch scores the batches it visits on the fly with a frozen copy. With a ref_cache folder either result is stored
    and reused by later trainings of the same base weights: the whole dataset's log-probs (keyed by the weights and
    the tokenized pairs), or each batch's (keyed by the weights and the batch's token ids). The decision per profile
    and its memory arithmetic: benchmarks/bench_memory.py part 3.
    """
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
    )
    settings.update(config_overrides)
    return DPOLConfig(**settings)


def make_dpo_l_trainer(model, ref_model, tokenizer, pairs: pd.DataFrame, cfg: TrainingConfig, output_dir: str,
                       seed: int, max_steps: int | None = None, *, eval_pairs: pd.DataFrame | None = None,
                       device: str = "auto", precompute_ref_log_probs: bool | None = None,
                       callbacks: list | None = None, args: DPOLConfig | None = None, ref_cache: str | None = None,
                       **config_overrides: Any) -> DPOLTrainer:
    """A DPOLTrainer set up from a pairs table and the profile's TrainingConfig (reference = initial model if None).

    args: a DPOLConfig from training_args (built before the model was loaded); otherwise built here. ref_cache: a
    folder of reference log-probs shared by trainings of the same base model (see training_args): a training that
    finds its dataset's, or its batches', reference log-probs there does not compute them again."""
    if args is None:
        args = training_args(cfg, output_dir, seed, max_steps, n_pairs=len(pairs), has_ref_model=ref_model is not None,
                             device=device, precompute_ref_log_probs=precompute_ref_log_probs, ref_cache=ref_cache,
                             **config_overrides)
    if ref_model is None and not args.precompute_ref_log_probs:
        if precompute_ref_log_probs is False:
            raise ValueError("with ref_model=None the reference log-probs must be precomputed "
                             "(precompute_ref_log_probs=True); pass a reference model otherwise")
        # a run shorter than an epoch: a frozen copy of the initial model scores the pairs it visits
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if args.bf16 and not deepspeed_enabled():
        master_weights_fp32(model)
    trainer = DPOLTrainer(
        model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
        train_dataset=pairs_to_dataset(pairs, tokenizer),
        eval_dataset=None if eval_pairs is None else pairs_to_dataset(eval_pairs, tokenizer),
        callbacks=callbacks, ref_cache=ref_cache,
    )
    _check_prepared(trainer.train_dataset, tokenizer, cfg.max_length, "train")
    if trainer.eval_dataset is not None:
        _check_prepared(trainer.eval_dataset, tokenizer, cfg.max_length, "eval")
    return trainer


def training_log(trainer: DPOTrainer) -> pd.DataFrame:
    """The per-step training logs (one row per logged step) from trainer.state.log_history."""
    rows = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return pd.DataFrame(rows).set_index("step") if rows else pd.DataFrame()


def train_and_save(model, tokenizer, pairs: pd.DataFrame, cfg: TrainingConfig, stage_dir, seed: int,
                   device: str = "cpu", max_steps: int | None = None, model_subdir: str = "model",
                   progress: bool = True, ref_cache: str | None = None) -> pd.DataFrame:
    """Train DPO-L + SFT on a pairs table, save the model (safetensors) atomically, and return the per-step log.

    The model is saved in the precision it trained in: fp32 (bf16 training keeps fp32 weights; casting them back to
    bf16 would drop every update smaller than bf16's rounding step). ref_cache: see make_dpo_l_trainer (in-process
    training only).

    With training.num_processes > 1 the training runs in that many processes under `accelerate launch` (see
    launch_training); otherwise here. With training.save_steps the trainer checkpoints under stage_dir/.trainer, and
    a rerun of the same training (same settings, seed and pairs) resumes from the last checkpoint.
    """
    from pathlib import Path

    stage_dir = Path(stage_dir)
    if num_processes(cfg) > 1:
        return launch_training(model, tokenizer, pairs, cfg, stage_dir, seed, device=device, max_steps=max_steps,
                               model_subdir=model_subdir)
    return _train_here(model, tokenizer, pairs, cfg, stage_dir, seed, device, max_steps, model_subdir, progress,
                       ref_cache)


def _run_fingerprint(pairs: pd.DataFrame, cfg: TrainingConfig, seed: int, max_steps: int | None, n_proc: int) -> str:
    """What a checkpoint belongs to: the pairs, the training settings, the seed and the process count."""
    import dataclasses
    import hashlib
    import json

    h = hashlib.sha256(pd.util.hash_pandas_object(pairs[list(PAIR_COLUMNS)], index=False).values.tobytes())
    h.update(json.dumps([dataclasses.asdict(cfg), seed, max_steps, n_proc], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _resume_point(scratch, fingerprint: str, is_main: bool = True) -> str | None:
    """The last checkpoint in scratch when it belongs to this very run; otherwise start afresh (stale ones removed)."""
    import shutil
    from pathlib import Path

    scratch = Path(scratch)
    stamp = scratch / "run_fingerprint.txt"
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return last_checkpoint(scratch)
    if is_main:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint + "\n")
    return None


def _train_here(model, tokenizer, pairs, cfg, stage_dir, seed, device, max_steps, model_subdir,
                progress: bool = True, ref_cache: str | None = None) -> pd.DataFrame:
    """train_and_save in this process."""
    import shutil

    from transformers import PrinterCallback

    scratch = stage_dir / ".trainer"
    resume = _resume_point(scratch, _run_fingerprint(pairs, cfg, seed, max_steps, 1))
    trainer = make_dpo_l_trainer(model, None, tokenizer, pairs, cfg, output_dir=str(scratch), seed=seed,
                                 max_steps=max_steps, device=device, ref_cache=ref_cache,
                                 **checkpoint_settings(cfg), **({} if progress else {"disable_tqdm": True}))
    if not progress:
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
    import shutil
    from pathlib import Path

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
        from ..core.artifacts import atomic_dir

        with atomic_dir(dest) as final:
            for item in tmp.iterdir():
                item.rename(final / item.name)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()


def _deepspeed_fp32_state_dict(trainer) -> dict[str, torch.Tensor]:
    """The full fp32 master weights of a DeepSpeed-trained model (ZeRO 1-3) on the main process's CPU (an empty dict
    on the others); a collective: every process calls it, one parameter at a time, so that no process but the main
    one ever holds more than one full parameter."""
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


ACCELERATE_CONFIGS = ("ddp", "zero2", "zero3", "fsdp2")
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def accelerate_config_file(name: str):
    """configs/accelerate/<name>.yaml (ddp, zero2, zero3 or fsdp2)."""
    from ..core.config import REPO_ROOT

    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"unknown accelerate config {name!r}: use one of {list(ACCELERATE_CONFIGS)}")
    return REPO_ROOT / "configs" / "accelerate" / f"{name}.yaml"


def deepspeed_config_file(name: str):
    """configs/accelerate/ds_<name>.json, the DeepSpeed config a zero2/zero3 accelerate config names (bf16 with fp32
    gradient accumulation); None for ddp and fsdp2."""
    return REPO_CONFIGS / f"ds_{name}.json" if name.startswith("zero") else None


def launch_command(job_file, cfg: TrainingConfig, device: str) -> list[str]:
    """The `accelerate launch` command line that runs tsq_utils.method.train_entry on a job file in num_processes
    processes."""
    import sys

    n = num_processes(cfg)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if device == "cpu":
        # CPU (tests, a laptop): plain DDP over gloo, launched through torch's elastic launcher as on GPUs
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", "1"]
    else:
        name = getattr(cfg, "accelerate_config", "ddp") or "ddp"
        cmd += ["--config_file", str(accelerate_config_file(name))]
        if deepspeed_config_file(name) is not None:  # the yaml's path is relative to the repository root
            cmd += ["--deepspeed_config_file", str(deepspeed_config_file(name))]
    cmd += ["--num_processes", str(n), "--main_process_port", str(_free_port()),
            "-m", "tsq_utils.method.train_entry", "--job", str(job_file)]
    return cmd


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_training(model, tokenizer, pairs: pd.DataFrame, cfg: TrainingConfig, stage_dir, seed: int,
                    device: str = "cuda", max_steps: int | None = None, model_subdir: str = "model") -> pd.DataFrame:
    """train_and_save in training.num_processes processes: write a job file, `accelerate launch` the training entry
    point (tsq_utils.method.train_entry) on it, and return the log it wrote. The in-process model only names the
    weights."""
    import dataclasses
    import subprocess
    from pathlib import Path

    from ..core.artifacts import atomic_write_json, load_table, save_table

    stage_dir = Path(stage_dir)
    ref = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not ref or not Path(ref).is_dir() and "/" not in ref:
        raise ValueError(f"cannot tell which weights the training processes should load (model.name_or_path={ref!r})")
    job_dir = stage_dir / ".launch"
    job_dir.mkdir(parents=True, exist_ok=True)
    save_table(pairs[list(PAIR_COLUMNS)].reset_index(drop=True), job_dir / "pairs.parquet")
    job = {"model": str(ref), "tokenizer": str(getattr(tokenizer, "name_or_path", "") or ref),
           "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
           "training": dataclasses.asdict(cfg), "seed": seed, "max_steps": max_steps, "device": device,
           "pairs": str(job_dir / "pairs.parquet"), "stage_dir": str(stage_dir), "model_subdir": model_subdir,
           "log": str(job_dir / "training_log.parquet"),
           "resume": _resume_point(stage_dir / ".trainer",
                                   _run_fingerprint(pairs, cfg, seed, max_steps, num_processes(cfg)))}
    atomic_write_json(job_dir / "job.json", job)
    if device == "cuda":  # the processes need the GPU memory the notebook's copy holds
        model.to("cpu")
        torch.cuda.empty_cache()
    cmd = launch_command(job_dir / "job.json", cfg, device)
    print("launching:", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=str(Path(__file__).resolve().parents[2]))
    if done.returncode != 0:
        raise RuntimeError(f"the {num_processes(cfg)}-process training failed (exit {done.returncode}); its output "
                           f"is above. Job file: {job_dir / 'job.json'}")
    log = load_table(job["log"]).set_index("step")
    import shutil

    shutil.rmtree(stage_dir / ".trainer", ignore_errors=True)
    shutil.rmtree(job_dir, ignore_errors=True)
    return log
