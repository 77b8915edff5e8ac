"""The reference log-probs cache: what they depend on (reference_cache_key), and reading and writing them, so that
trainings of the same base weights on the same tokenized pairs (or batches) score the reference once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from trl import DPOConfig

# Bump when the reference scoring changes what it computes: cached log-probs of older code are then not reused
_REF_CACHE_VERSION = "1"


def reference_cache_key(model_hash: str, dataset: Dataset, args: DPOConfig) -> str:
    """What reference log-probs depend on: the reference weights (TRL's hash_module: every tensor's dtype and bytes),
    the tokenized pairs (prompt, chosen and rejected token ids, in order), the truncation (max_length and mode), the
    compute precision and device type, and the scoring code's version. Two trainings with equal keys (notebook 06's
    rows on the same pairs with other seeds or objectives, a rerun of notebook 04) share one scoring pass."""
    h = hashlib.sha256(json.dumps([_REF_CACHE_VERSION, model_hash, args.max_length, args.truncation_mode,
                                   bool(args.bf16), str(args.device.type)]).encode())
    cols = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    for batch in cols.iter(batch_size=1024):
        for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]):
            h.update(json.dumps([p, c, r], separators=(",", ":")).encode())
    return h.hexdigest()


def load_cached_ref_logps(cache_dir, key: str, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (chosen, rejected) reference log-probs under key, or None when absent or of another size."""
    path = Path(cache_dir) / f"{key}.safetensors"
    if not path.is_file():
        return None
    t = load_file(str(path))
    if t["chosen"].numel() != n or t["rejected"].numel() != n:
        return None
    return t["chosen"], t["rejected"]


def save_cached_ref_logps(cache_dir, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Write the reference log-probs under key atomically (a temporary file renamed into place)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    save_file({"chosen": chosen.float().contiguous(), "rejected": rejected.float().contiguous()}, str(tmp))
    os.replace(tmp, cache_dir / f"{key}.safetensors")

