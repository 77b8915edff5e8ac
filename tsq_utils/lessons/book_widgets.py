"""Widgets for the book as static HTML: progress bars, sliders and their boxes drawn from the state the run saved.

An executed notebook keeps each widget's last state (nb.metadata.widgets). Without a kernel the widgets cannot move
anyway, so the book draws that state as plain HTML (a <progress> bar, a disabled range input with its value) instead
of loading the widget JavaScript from a CDN. A widget kind not drawn here falls back to its text form.
"""

from __future__ import annotations

import copy
import html

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_BOXES = {"HBoxModel": "row", "VBoxModel": "column", "BoxModel": "row", "GridBoxModel": "row"}
_SNAPSHOT = "the state this control had at the end of the run; run the notebook to use it"


def _number(value: object, fmt: str) -> str:
    """A slider's readout as the widget shows it (its readout_format, e.g. '.2f' or 'd'), else str(value)."""
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def _slider(s: dict) -> str:
    lo, hi, step = s.get("min", 0), s.get("max", 100), s.get("step", 1)
    value = s.get("value", lo)
    if isinstance(value, list):  # a range slider: its two ends
        shown = " – ".join(_number(v, s.get("readout_format", "")) for v in value)
        value = value[0]
    else:
        shown = _number(value, s.get("readout_format", ""))
    return (f'<label title="{_SNAPSHOT}" style="display:flex;gap:6px;align-items:center">'
            f"{html.escape(str(s.get('description', '')))} "
            f'<input type="range" disabled min="{lo}" max="{hi}" step="{step}" value="{value}"> '
            f"<span>{html.escape(shown)}</span></label>")


def widget_html(model_id: str, state: dict, depth: int = 0) -> str | None:
    """The static HTML of one widget (and its children) from the saved state; None for a kind not drawn here."""
    model = state.get(model_id)
    if model is None or depth > 20:
        return None
    name, s = model.get("model_name", ""), model.get("state", {})
    if name in _BOXES:
        kids = [widget_html(str(c).removeprefix("IPY_MODEL_"), state, depth + 1) for c in s.get("children", [])]
        if any(k is None for k in kids):
            return None
        return (f'<div class="book-widget" style="display:flex;flex-direction:{_BOXES[name]};gap:6px;'
                f'align-items:center">{"".join(kids)}</div>')
    if name == "HTMLModel":  # tqdm's description and counter, HTML the run itself wrote
        return f"<span>{s.get('value', '')}</span>"
    if name == "LabelModel":
        return f"<span>{html.escape(str(s.get('value', '')))}</span>"
    if name.endswith("ProgressModel"):
        return f'<progress value="{s.get("value", 0)}" max="{s.get("max", 100)}" style="width:240px"></progress>'
    if name.endswith("SliderModel"):
        return _slider(s)
    return None


def static_widgets(nb):
    """A copy of an executed notebook whose widget outputs are static HTML (or their text, where the state is
    missing) and whose widget state is gone, so that nbconvert adds no widget script; one without widgets as it is."""
    views = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if WIDGET_VIEW in o.get("data", {})]
    if not views and "widgets" not in nb.metadata:
        return nb
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            view = out.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                continue
            drawn = widget_html(view.get("model_id", ""), state)
            out["data"] = {"text/html": drawn} if drawn is not None else {
                "text/plain": out["data"].get("text/plain", "")}
    nb.metadata.pop("widgets", None)
    return nb
