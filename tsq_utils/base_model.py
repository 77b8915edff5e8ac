"""Stage 00: the base model of a profile (the shipped or freshly trained toy reasoner, or a hub model) and its task."""

from __future__ import annotations

import json
from pathlib import Path

from .config import REPO_ROOT, Profile, resolve_device

POINTER = "base_model.json"


def toy_model_dir(profile: Profile, run_dir: Path) -> Path:
    """Where a profile's toy reasoner lives: the shipped folder, or the run folder when it is retrained."""
    if profile.pretrain.retrain:
        return run_dir / "base_model" / "model"
    return REPO_ROOT / profile.model.path


def hub_model_ref(profile: Profile) -> str:
    """The hub id or local folder that a hub profile loads (local_override wins)."""
    return profile.model.local_override or profile.model.path


def write_pointer(stage_dir: Path, ref: str, kind: str, extra: dict | None = None) -> Path:
    """Record which model later stages load as the base (atomic)."""
    from .artifacts import atomic_write_json

    path = stage_dir / POINTER
    atomic_write_json(path, {"model": str(ref), "kind": kind, **(extra or {})})
    return path


def read_pointer(run_dir: Path, profile_name: str) -> dict:
    """The base-model record written by notebook 00; a clear error when it is missing."""
    path = run_dir / "base_model" / POINTER
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run notebooks/00_base_model.ipynb first (profile {profile_name})"
        )
    return json.loads(path.read_text())


def load_model(ref: str, kind: str, profile: Profile):
    """Load (model, tokenizer) from a toy folder or a hub id / local directory; safetensors only, no remote code."""
    device = resolve_device(profile)
    if kind == "toy":
        from .toyworld import load_reasoner

        return load_reasoner(ref, device=device)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[profile.model.dtype]
    tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, use_safetensors=True, trust_remote_code=False).to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_base(run_dir: Path, profile: Profile):
    """Load the base model that notebook 00 recorded for this profile."""
    ptr = read_pointer(run_dir, profile.name)
    return load_model(ptr["model"], ptr["kind"], profile)


def prepare_base(stage, progress: bool = True):
    """Stage 00's work: train (retrain or ci) or load the toy reasoner, or load a hub model; record it for later stages."""
    from .toyworld import build_reasoner, load_reasoner, read_manifest, save_reasoner

    profile = stage.profile
    if profile.model.source == "hub":
        ref = hub_model_ref(profile)
        model, tok = load_model(ref, "hub", profile)
        write_pointer(stage.dir, ref, "hub")
        return model, tok, {"model": ref, "kind": "hub"}
    path = toy_model_dir(profile, stage.run_dir)
    if profile.pretrain.retrain:
        if stage.force or not (path / "model.safetensors").exists() or read_manifest(path).get("pretrain_config") != dict(vars(profile.pretrain)):
            model, tok, manifest = build_reasoner(profile, progress=progress)
            save_reasoner(model, tok, path, manifest)
    model, tok = load_reasoner(path, device=resolve_device(profile))
    info = read_manifest(path)
    write_pointer(stage.dir, str(path), "toy")
    return model, tok, info


def base_inputs(run_dir: Path, profile: Profile) -> dict:
    """What later stages hash for resume: the pointer and, for a toy model, its weights."""
    ptr = read_pointer(run_dir, profile.name)
    inputs = {"base_model": run_dir / "base_model" / POINTER}
    if ptr["kind"] == "toy":
        inputs["base_weights"] = Path(ptr["model"]) / "model.safetensors"
    return inputs


def heldout_problems(profile: Profile, tokenizer, n: int):
    """Held-out toy problems (their own split and seed, never seen in training), spread evenly over k."""
    from .config import stage_seed
    from .sampling import toy_problem_table
    from .toyworld import make_problems

    tw = profile.toyworld
    return toy_problem_table(make_problems(n, stage_seed(profile.seed, "heldout"), tw.k_min, tw.k_max, tw.max_value,
                                           split="heldout"), tokenizer)


def reasoner_checks(greedy, sampled, heldout, tokenizer) -> dict:
    """The properties that make a base reasoner worth compressing, measured on held-out problems."""
    import pandas as pd

    from .sampling import per_problem_stats

    oracle = oracle_lengths(heldout, tokenizer)
    g = greedy.merge(oracle, on="problem_id")
    stats = per_problem_stats(sampled)
    by_k = pd.DataFrame({
        "problems": greedy.groupby("k").size(),
        "greedy_acc": greedy.groupby("k")["correct"].mean(),
        "greedy_tokens": greedy.groupby("k")["n_tokens"].mean(),
        "oracle_tokens": oracle.groupby("k")["oracle_tokens"].mean(),
        "sampled_acc": sampled.groupby("k")["correct"].mean(),
        "sampled_tokens": sampled.groupby("k")["n_tokens"].mean(),
        "length_cv": stats.groupby("k")["cv_tokens"].mean(),
    })
    by_k.index.name = "k"
    return {
        "heldout_problems": int(len(greedy)),
        "greedy_accuracy": float(greedy["correct"].mean()),
        "greedy_tokens": float(greedy["n_tokens"].mean()),
        "oracle_tokens": float(g["oracle_tokens"].mean()),
        "greedy_over_oracle": float(g["n_tokens"].mean() / g["oracle_tokens"].mean()),
        "sampled_accuracy": float(sampled["correct"].mean()),
        "sampled_responses": int(len(sampled)),
        "mean_cv": float(stats["cv_tokens"].mean()),
        "by_k": by_k.round(4).reset_index().to_dict(orient="list"),
        "oracle_len_by_k": by_k["oracle_tokens"],
    }


def oracle_lengths(problems, tokenizer):
    """Tokens of the oracle (shortest correct) trace of each toy problem in a problems table."""
    import pandas as pd

    from .toyworld import oracle_trace, parse_question

    rows = []
    for pid, k, q in zip(problems["problem_id"], problems["k"], problems["problem"]):
        text = oracle_trace(parse_question(q, pid))
        rows.append({"problem_id": pid, "k": int(k), "oracle_text": text,
                     "oracle_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"])})
    return pd.DataFrame(rows)
