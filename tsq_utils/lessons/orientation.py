"""Where a lesson stands: the pipeline diagram at its top, what this run of it reads from the profile and how long
its stage took when it last ran."""

from __future__ import annotations

import html
from typing import Any, Sequence

from IPython.display import HTML

from ..core.artifacts import read_json

# (notebook number, stage name, label) in pipeline order; the numbers are the notebooks' own.
STEPS = (("00", "base_model", "base model"), ("01", "sampling", "sampling"), ("02", "selection", "selection"),
         ("03", "refinement", "KL refinement"), ("04", "training", "DPO-L training"),
         ("05", "evaluation", "evaluation"), ("06", "ablations", "ablations"), ("07", "tldr", "TLDR"))

_BOX = "display:inline-block;padding:2px 7px;margin:1px;border-radius:4px;font-size:12px;"
_HERE = _BOX + "background:#2b6cb0;color:white;font-weight:bold;"
_OTHER = _BOX + "background:#edf2f7;color:#444;"


def _index(stage: str) -> int:
    """The position of a stage given by number ("03") or name ("refinement")."""
    for i, (num, name, _) in enumerate(STEPS):
        if stage in (num, name):
            return i
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(n for _, n, _ in STEPS)}")


def pipeline_diagram_html(stage: str) -> str:
    """The pipeline as a row of boxes, this lesson's highlighted (HTML)."""
    here = _index(stage)
    boxes = [f"<span style='{_HERE if i == here else _OTHER}'>{num} {html.escape(label)}</span>"
             for i, (num, _, label) in enumerate(STEPS)]
    main, side = " → ".join(boxes[:6]), " · ".join(boxes[6:])
    return (f"<div style='margin:0.3em 0'>{main}<br><span style='font-size:11px;color:#666'>beside the pipeline, on "
            f"its artifacts:</span> {side}</div>")


def pipeline_diagram(stage: str) -> Any:
    """The pipeline diagram with this lesson's stage highlighted, for display at a lesson's top."""
    return HTML(pipeline_diagram_html(stage))


def settings_line(reads: dict[str, Any], keys: Sequence[str]) -> str:
    """'key = value' for the named profile keys this stage reads (a key it does not read is an error)."""
    missing = [k for k in keys if k not in reads]
    if missing:
        raise KeyError(f"not read by this stage: {', '.join(missing)}")
    return ", ".join(f"{k} = {reads[k]:g}" if isinstance(reads[k], float) else f"{k} = {reads[k]}" for k in keys)


def timing_line(manifest: dict | None) -> str:
    """How long the stage took when it last finished on this profile, and that a rerun reuses its outputs."""
    secs = (manifest or {}).get("wall_time_s")
    if not manifest or not manifest.get("complete", True) or secs is None:
        return ("No finished run of this stage on this profile yet: no time measured (run_all.sh prints each "
                "notebook's time when it ends).")
    return (f"Its last finished run on this profile recorded {secs:.0f} s (the manifest's wall time). While the "
            "settings, inputs and code stay the same, the stage's outputs are reused, so rerunning this notebook (e.g. "
            "after run_all.sh) only redraws the lesson: seconds.")


def lesson_top(stage: Any, keys: Sequence[str]) -> Any:
    """A lesson's opening: the pipeline diagram, the profile and the settings it runs with (the named keys), and
    the stage's measured time. `stage` is the notebook's setup_stage object."""
    reads = stage.profile_reads()
    path = stage.manifest_path
    manifest = read_json(path) if path.is_file() else None
    text = (f"<p style='margin:0.2em 0'>This run: profile <b>{html.escape(stage.profile.name)}</b>; "
            f"{html.escape(settings_line(reads, keys))}.<br>{html.escape(timing_line(manifest))}</p>")
    return HTML(pipeline_diagram_html(stage.name) + text)
