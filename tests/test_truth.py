"""Truth by construction: a number or setting a profile can change is never static prose in a lesson.

The static markdown of notebooks/*.py may name a knob (N, ε, η, the temperature) and explain it, but its value, the
decoding it implies ("greedy"), and the run's counts and results come from the run: generated markdown or printed
lines. Sentences about the paper, and made-up cases in exercises ("say", "e.g.", "suppose"), are exempt. Then the
executed `ci` notebooks are checked against their own profile: every "N = …", "ε = …" they print is the setting.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from executed_notebooks import ROOT, executed_ci_notebooks
from tsq_utils.core.profile_loader import load_profile

NOTEBOOK_SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))

# (what, pattern) of setting-dependent statements; each match in a non-exempt sentence is a finding
SETTING_DEPENDENT = [
    ("a temperature value", re.compile(r"(\bT\b|\btemperature\b)\s*\$?\s*(=|of|at)\s*\$?\s*\d")),
    ("greedy decoding", re.compile(r"\bgreed(y|ily)\b", re.I)),
    # 0 and 1 are definitions ("α = 0 is Shortest", "η = 1 is DPO-L alone"), not settings
    ("a knob's value", re.compile(r"(\b[NKLM]\b|η|\\eta|α|\\alpha|ε|\\varepsilon|β|\\beta)\s*\$?\s*=\s*\$?\s*"
                                  r"(?![01](?![.\d]))\d")),
    ("a run's before -> after", re.compile(r"\d\s*(→|->|\\to)\s*\$?\d")),
    ("a run's count", re.compile(r"\b\d+ of (the )?\d+\b")),
    ("a run's percentage", re.compile(r"\d(\.\d+)?\s*%")),
]
EXEMPT = re.compile(r"paper|\be\.g\.|\bsay\b|\bsuppose\b|for example|made-up|\bTable \d|§|Figure \d", re.I)

# Words that are true whatever the profile says, with the reason (notebook, phrase): keep it short.
ALLOWED = {
    # 00 decodes its held-out check greedily in code (temperature 0), whatever the profile's sampling temperature
    ("00", "greedy"), ("00", "greedily"),
}


def markdown_sentences(path: Path) -> list[str]:
    """The sentences of a jupytext notebook's markdown cells (comment markers dropped)."""
    text, cells, cur, md = path.read_text(), [], [], False
    for line in text.splitlines():
        if line.startswith("# %%"):
            if md and cur:
                cells.append(" ".join(cur))
            cur, md = [], "[markdown]" in line
        elif md:
            cur.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
    if md and cur:
        cells.append(" ".join(cur))
    return [s.strip() for c in cells for s in re.split(r"(?<=[.!?:;])\s+(?=[A-Z*(\[`$-])", c) if s.strip()]


def static_findings(path: Path) -> list[str]:
    """Each setting-dependent statement in the static markdown of one notebook, as 'what: sentence'."""
    nn = path.name[:2]
    out = []
    for s in markdown_sentences(path):
        if EXEMPT.search(s):
            continue
        for what, pat in SETTING_DEPENDENT:
            m = pat.search(s)
            if m and (nn, m.group(0).strip().lower()) not in ALLOWED:
                out.append(f"{what}: {s[:160]}")
    return out


def test_the_scan_finds_setting_dependent_prose(tmp_path):
    nb = tmp_path / "07_x.py"
    nb.write_text("# %% [markdown]\n# The dev set is decoded greedily. We use η = 0.5 here.\n#\n"
                  "# Chosen responses went 94.7 → 69.6 tokens. Only 200 of 622 were refined.\n"
                  "# %%\nx = 1  # T = 0.6 in code is fine\n"
                  "# %% [markdown]\n# The paper uses η = 0.5 and T = 0.6. Say ε = 0.01: what changes?\n")
    found = static_findings(nb)
    assert [f.split(":")[0] for f in found] == ["greedy decoding", "a knob's value", "a run's before -> after",
                                                "a run's count"]


@pytest.mark.parametrize("path", NOTEBOOK_SOURCES, ids=lambda p: p.name)
def test_static_markdown_states_no_setting(path):
    assert static_findings(path) == []


# (notebook, symbol printed as "<symbol> = value", profile key): the settings each lesson's output names
PRINTED_SETTINGS = [
    ("01", "N", "sampling.n"), ("02", "N", "sampling.n"), ("02", "α", "selection.alpha"),
    ("03", "ε", "refinement.epsilon"),
]


def _outputs_text(nb) -> str:
    """What the run printed and displayed, without the collapsed answers (their worked examples are made-up cases)."""
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if str(o.get("data", {}).get("text/html", "")).startswith("<details>"):
                continue
            parts.append(o.get("text", ""))
            parts.extend(str(o.get("data", {}).get(k, "")) for k in ("text/plain", "text/markdown", "text/html"))
    return "\n".join(parts)


@pytest.mark.parametrize("nn, symbol, key", PRINTED_SETTINGS, ids=lambda v: str(v))
def test_executed_ci_notebook_prints_its_own_settings(nn, symbol, key):
    nbs = executed_ci_notebooks()
    name = next(n for n in nbs if n.startswith(nn + "_"))
    section, field = key.split(".")
    want = getattr(getattr(load_profile("ci"), section), field)
    said = re.findall(rf"(?<![\w\\/]){re.escape(symbol)} = (\d+(?:\.\d+)?(?:e-?\d+)?)", _outputs_text(nbs[name]))
    assert said, f"{name} never prints {symbol} = ..."
    assert {float(v) for v in said} == {float(want)}, f"{name}: {symbol} printed as {said}, profile {want}"
