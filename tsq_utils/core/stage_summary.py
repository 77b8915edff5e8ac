"""The set-up summary a notebook prints under its setup cell: the profile, seed, sizes, folders and the previous run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifacts import package_versions, read_json
from .stage_paths import display_path

# Profile values worth seeing in each stage's set-up summary (dotted keys).
SIZE_KEYS: dict[str, tuple[str, ...]] = {
    "base_model": ("pretrain.retrain", "pretrain.n_tokens", "pretrain.hidden_size", "pretrain.num_layers"),
    "sampling": ("sampling.backend", "sampling.n", "sampling.temperature", "sampling.max_new_tokens"),
    "selection": ("selection.variant", "selection.alpha", "selection.max_pairs"),
    "refinement": ("refinement.enabled", "refinement.n_candidates", "refinement.window", "refinement.epsilon"),
    "training": ("training.epochs", "training.batch_size", "training.lr", "training.beta", "training.lam"),
    "evaluation": ("evaluation.n_samples", "evaluation.max_new_tokens", "evaluation.budget"),
    "ablations": ("evaluation.n_samples", "evaluation.max_new_tokens", "selection.alpha"),
    "tldr": ("tldr.max_steps", "tldr.batch_size", "tldr.update_every", "tldr.eta"),
}


def get_dotted(obj: Any, dotted: str) -> Any:
    """getattr along a dotted path (profile.selection.alpha)."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj



def summary_lines(st: Any) -> list[str]:
    """The set-up summary a notebook prints under its setup cell (st: its core.stage.Stage)."""
    p = st.profile
    d = p.data
    sizes = ", ".join(f"{k}={get_dotted(p, k)}" for k in SIZE_KEYS[st.name])
    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items() if v)
    params = ", ".join(f"{k}={v!r}" for k, v in st.params.items()) or "(profile defaults)"
    if st.manifest_path.is_file():
        try:
            m = read_json(st.manifest_path)
        except (OSError, ValueError):
            m = None
        if isinstance(m, dict):
            previous = (f"manifest from {m.get('finished_at', '?')}"
                        + ("" if m.get("complete") is True else " (incomplete)"))
            try:
                why = st.settings_reason(m) if m.get("complete") is True and m.get("stage") == st.name else None
            except (AttributeError, TypeError, KeyError):
                why = "manifest.json is malformed"
            if why:
                previous += f"; will rerun: {why}"
            elif st.kept_note:
                previous += f"; {st.kept_note}"
        else:
            previous = "unreadable manifest.json (the stage will rerun and rewrite it)"
    else:
        previous = "none"
    lines = [
        f"stage {st.name} ({st.notebook}), profile {p.name} ({display_path(Path(p.source_file))})",
        f"  model    : {p.model.source} {p.model.path} ({p.model.dtype}, device {p.device})",
        f"  seed     : {st.seed} (from run seed {p.seed})   threads: {st.threads}",
        f"  data     : train {d.train} x {d.n_train_problems}, eval {'/'.join(map(str, d.eval))} x {d.n_eval_problems}",
        f"  sizes    : {sizes}",
        f"  params   : {params}",
        f"  folders  : {display_path(st.dir)}, figures in {display_path(st.figures)}",
        f"  previous : {previous}" + ("   force=True: will rerun" if st.force else ""),
        f"  versions : {versions}",
    ]
    return lines
