"""DPOLTrainer: TRL's DPOTrainer with the loss η·L_DPO-L + (1 − η)·L_SFT, its reference log-probs scored once and
shared across processes (and, with a ref_cache, across trainings), and a stop on a non-finite loss."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from trl import DPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import hash_module

from .loss import DPOLConfig, NonFiniteLossError, dpo_l_pair_losses, length_margin, split_forward
from .ref_cache import _REF_CACHE_VERSION, load_cached_ref_logps, reference_cache_key, save_cached_ref_logps

# Batch keys the collator adds that the model's forward must not receive
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


@dataclass(frozen=True)
class _Terms:
    """One batch's loss and the terms it is made of (for the finiteness check and the logged metrics)."""

    loss: torch.Tensor
    dpo_l: torch.Tensor
    sft: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    margin: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor


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
            self._ref_hash = hash_module(self.accelerator.unwrap_model(self.ref_model))

    def _batch_cache_key(self, inputs: dict[str, torch.Tensor]) -> str | None:
        """The batch cache's key of a [chosen; rejected] batch (None without a ref_cache)."""
        if self._ref_hash is None:
            return None
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
        key = [None]
        if self.accelerator.is_main_process:
            key = [reference_cache_key(self._precompute_model_hash, dataset, self.args)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(key, from_process=0)
        return key[0]

    @torch.no_grad()
    def _score_reference(self, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probs of every pair under the reference (the initial policy when there is no ref_model)."""
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

        terms = _Terms(loss, dpo_l, sft, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, margin,
                       chosen_len, rejected_len)
        self._check_finite(terms, mode)
        self._log_metrics(mode, inputs, outputs, shift_mask, terms)
        if return_outputs:
            # Trainer.prediction_step asks for outputs when prediction_loss_only is off; the fused head builds no
            # logits, so they are recomputed (as TRL does)
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _check_finite(self, t: _Terms, mode: str) -> None:
        """Raise NonFiniteLossError when the loss of this step is NaN or infinite (on any process)."""
        loss, dpo_l, sft, margin = t.loss, t.dpo_l, t.sft, t.margin
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = (
            t.chosen_logps, t.rejected_logps, t.ref_chosen_logps, t.ref_rejected_logps)
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

    def _log_metrics(self, mode: str, inputs: dict, outputs: SimpleNamespace, shift_mask: torch.Tensor,
                     t: _Terms) -> None:
        """Record TRL's standard DPO metrics plus length_margin, dpo_l_loss, sft_loss and completion lengths."""
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = (
            t.chosen_logps, t.rejected_logps, t.ref_chosen_logps, t.ref_rejected_logps)
        margin, chosen_len, rejected_len, dpo_l, sft = t.margin, t.chosen_len, t.rejected_len, t.dpo_l, t.sft
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
