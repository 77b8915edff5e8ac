"""Trainer checkpoints: when to write them (training.save_steps), which run they belong to and where a rerun of the
same training resumes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from transformers.trainer_utils import get_last_checkpoint

from ...core.config import TrainingConfig
from .data import PAIR_COLUMNS


def checkpoint_settings(cfg: TrainingConfig) -> dict[str, Any]:
    """Trainer checkpointing from training.save_steps: every N optimizer steps (last two kept), or none when 0."""
    every = int(cfg.save_steps)
    if every <= 0:
        return {"save_strategy": "no"}
    # save_only_model=False keeps the optimizer, scheduler and RNG state: a resumed run continues the same run
    return {"save_strategy": "steps", "save_steps": every, "save_total_limit": 2, "save_only_model": False}


def last_checkpoint(output_dir) -> str | None:
    """The newest checkpoint-<step> folder the trainer left in output_dir (None when there is none)."""
    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None



def _run_fingerprint(pairs: pd.DataFrame, cfg: TrainingConfig, seed: int, max_steps: int | None, n_proc: int) -> str:
    """What a checkpoint belongs to: the pairs, the training settings, the seed and the process count."""
    h = hashlib.sha256(pd.util.hash_pandas_object(pairs[list(PAIR_COLUMNS)], index=False).values.tobytes())
    h.update(json.dumps([dataclasses.asdict(cfg), seed, max_steps, n_proc], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _resume_point(scratch, fingerprint: str, is_main: bool = True) -> str | None:
    """The last checkpoint in scratch when it belongs to this very run; otherwise start afresh (stale ones removed)."""
    scratch = Path(scratch)
    stamp = scratch / "run_fingerprint.txt"
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return last_checkpoint(scratch)
    if is_main:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint + "\n")
    return None
