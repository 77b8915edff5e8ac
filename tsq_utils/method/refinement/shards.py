"""Shards: responses refined in groups (one sampler call each), each finished group written to a shard folder as it
completes and read back by a rerun whose settings, responses, model and code match."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...core.artifacts import atomic_write_text
from ...core.config import RefinementConfig
from ...core.fingerprint import package_hash
from ...model import compat
from .plan import RefineResult, StepPlan, StepRecord

# Steps whose candidates one sampler call draws at most (responses are never split between calls): bounds the
# prefix texts and samples held at once; the toy profile's 200-400 responses fit in one call.
MAX_STEPS_PER_CALL = 4096


def _sampling_groups(plans: list[StepPlan], min_groups: int = 1) -> list[list[StepPlan]]:
    """Consecutive responses grouped so that one sampler call holds at most MAX_STEPS_PER_CALL steps (at least
    one response each): bounds the memory of the prefix texts and samples held at once. With min_groups > 1 a group
    also holds at most an even share of the steps, so that there are about min_groups groups for processes to share
    (the profile's `shards`: the grouping, and so every result, never depends on how many processes run)."""
    total = sum(len(p.jobs) for p in plans)
    cap = min(MAX_STEPS_PER_CALL, max(1, -(-total // max(1, min_groups))))
    groups: list[list[StepPlan]] = [[]]
    n_steps = 0
    for plan in plans:
        if groups[-1] and n_steps + len(plan.jobs) > cap:
            groups.append([])
            n_steps = 0
        groups[-1].append(plan)
        n_steps += len(plan.jobs)
    return groups


def run_settings(cfg: RefinementConfig, seed: int, options: Any, model: torch.nn.Module) -> dict:
    """What every group of a run depends on besides its responses (with a shard folder: the model and the code)."""
    keep = options.shard_dir is not None
    return dict(n_candidates=cfg.n_candidates, window=cfg.window, epsilon=cfg.epsilon, reduction=cfg.kl_reduction,
                temperature=cfg.temperature, max_step_tokens=cfg.max_step_tokens, seed=seed,
                batch_size=cfg.batch_size, sample_batch_size=options.sample_batch_size,
                cap_to_original=options.cap_to_original, scoring=cfg.scoring, candidates=cfg.candidates,
                steps=cfg.steps, max_steps_per_call=MAX_STEPS_PER_CALL, min_groups=options.shards,
                model=_model_fingerprint(model) if keep else None,
                # a code edit must not reuse groups that the old code refined
                code=package_hash() if keep else None)


def _model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of the model's weights (its size and a hash of the first values of every tensor)."""
    h = hashlib.sha256()
    for name, t in compat.unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _group_fingerprint(settings: dict, group: list[StepPlan]) -> str:
    """What a shard file must match to be reused: the refinement settings and the group's responses."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for plan in group:
        h.update(json.dumps([plan.response_id, plan.prompt, plan.text]).encode())
    return h.hexdigest()


def _save_group(path: Path, fingerprint: str, results: list[RefineResult]) -> None:
    """Write one group's refined responses (with their step records) atomically (json keeps NaN KLs exactly)."""
    atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "results": [asdict(r) for r in results]}))


class StaleShardError(ValueError):
    """A shard file holds a group of another refinement run (other settings, responses, model or code)."""


def _load_group(path: Path, fingerprint: str) -> list[RefineResult]:
    """A group written by _save_group, checked against the fingerprint of the group it should hold."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
            raise StaleShardError(f"{path} holds another refinement run (other settings, responses, model or code)")
        out = []
        for r in data["results"]:
            r = dict(r)
            r["steps"] = [StepRecord(**rec) for rec in r["steps"]]
            out.append(RefineResult(**r))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, StaleShardError):
            raise
        # a truncated or damaged shard (a run killed mid-write before writes were atomic, a full disk): redone
        print(f"refinement: shard {path} is unreadable ({type(e).__name__}: {e}): its group is redone and the file "
              "replaced")
        raise StaleShardError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return out


def reuse_group(path: Path, fingerprint: str) -> list[RefineResult] | None:
    """The group a shard file holds when it is this run's, else None (absent, or another run's: redone, replaced)."""
    if not path.exists():
        return None
    try:
        return _load_group(path, fingerprint)
    except StaleShardError:
        return None
