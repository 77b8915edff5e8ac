"""The display parts of a lesson: "What you should have seen" lines, collapsed answers, and live views (ipywidgets)
that render their default state headless."""

from __future__ import annotations

import html
from typing import Any, Callable, Sequence

import matplotlib.pyplot as plt
from IPython.display import HTML, Markdown, display
from matplotlib.figure import Figure


def seen(lines: Sequence[str]) -> Any:
    """'What you should have seen' as Markdown: one bullet per line (the lines come from the run's numbers)."""
    if not lines:
        raise ValueError("no summary lines")
    return Markdown("**What you should have seen** (from this run's numbers)\n\n" + "\n".join(f"- {s}" for s in lines))


def answer(text: str, title: str = "Answer") -> Any:
    """A collapsed answer (HTML <details>): open it after trying the exercise."""
    return HTML(f"<details><summary><b>{html.escape(title)}</b> (click to open)</summary>"
                f"<div style='margin:0.4em 1em'>{text}</div></details>")


def live(view: Callable[..., Any], **controls: Any) -> Any:
    """Show view(**defaults) now, as an ordinary output (papermill, nbval and the book see this default state), and
    re-render it in place when a control moves in a live notebook. Returns the controls' box (None without
    ipywidgets). Never waits for input."""
    values = {k: getattr(c, "value", c) for k, c in controls.items()}
    first = view(**values)
    handle = display(first, display_id=True)
    _close(first)
    try:
        import ipywidgets as widgets  # optional (the dev extra): without it a lesson shows the default state
    except ImportError:  # headless without ipywidgets: the default state is all there is
        return None
    sliders = {k: c for k, c in controls.items() if isinstance(c, widgets.ValueWidget)}
    if not sliders:
        return None

    def update(_change: Any = None) -> None:
        out = view(**{k: getattr(c, "value", c) for k, c in controls.items()})
        if handle is not None:
            handle.update(out)
        else:  # no IPython shell (a plain script): show it again
            display(out)
        _close(out)

    for c in sliders.values():
        c.observe(update, names="value")
    box = widgets.HBox(list(sliders.values()))
    display(box)
    return box


def _close(obj: Any) -> None:
    """Close a matplotlib figure once displayed, so that it is not drawn twice."""
    if isinstance(obj, Figure):
        plt.close(obj)


def slider(value: float, lo: float, hi: float, step: float, description: str) -> Any:
    """A float (or int, for int arguments) slider; the plain value where ipywidgets is missing."""
    try:
        import ipywidgets as widgets  # optional (the dev extra): without it a lesson shows the default state
    except ImportError:
        return value
    style = {"description_width": "initial"}
    if all(isinstance(v, int) for v in (value, lo, hi, step)):
        return widgets.IntSlider(value=value, min=lo, max=hi, step=step, description=description, style=style)
    return widgets.FloatSlider(value=value, min=lo, max=hi, step=step, description=description, style=style,
                               readout_format=".3g")


def pct(x: float) -> str:
    """x as a percentage with one decimal."""
    return f"{100 * x:.1f}%"
