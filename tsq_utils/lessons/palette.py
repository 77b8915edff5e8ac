"""The one palette of every figure: a fixed colour, marker and line style per model and per ablation variant."""

from __future__ import annotations

from dataclasses import dataclass

# Okabe–Ito and Tol colours (colour-blind safe). A model or variant keeps its colour and marker in every figure;
# "ours" (TokenSqueeze, Q-DYN, KL refinement, DPO-L + SFT) is always vermillion squares.
OURS = "#D55E00"


@dataclass(frozen=True)
class Style:
    """How one model or variant is drawn."""

    color: str
    marker: str
    ls: str = "-"
    label: str = ""

    def kw(self, with_marker: bool = True) -> dict:
        """Keyword arguments for Axes.plot."""
        d = {"color": self.color, "ls": self.ls}
        if with_marker:
            d["marker"] = self.marker
        return d


STYLES: dict[str, Style] = {
    # models
    "base": Style("#4D4D4D", "o", "-", "base"),
    "tokensqueeze": Style(OURS, "s", "-", "TokenSqueeze"),
    "tldr": Style("#0072B2", "^", "-", "TLDR"),
    "static_mix": Style("#8C6D31", "v", "-.", "static 1:1 mix"),
    "oracle": Style("#000000", "x", "--", "oracle"),
    "short": Style("#009E73", "P", ":", "short model"),
    "paper": Style("#7F7F7F", "D", "-", "paper (7B)"),
    # decoding of the base model (notebook 00)
    "greedy": Style("#4D4D4D", "o", "-", "greedy"),
    "sampled": Style("#999999", "s", ":", "sampled"),
    # Table 2: selection variants
    "table2/shortest": Style("#E69F00", "v", "-", "Shortest"),
    "table2/q_fix": Style("#CC79A7", "P", "-", "Q-FIX"),
    "table2/q_dyn": Style(OURS, "s", "-", "Q-DYN"),
    "table2/q_dyn_extra": Style("#882255", "X", "-", "Q-DYN + extra negatives"),
    # Table 3: refinement
    "table3/none": Style("#999999", "o", "-", "no refinement"),
    "table3/kl": Style(OURS, "s", "-", "KL refinement"),
    "table3/no_kl": Style("#117733", "D", "-", "rewrite without KL"),
    # Table 4: objectives
    "table4/dpo": Style("#332288", "<", "-", "DPO"),
    "table4/sft": Style("#44AA99", ">", "-", "SFT"),
    "table4/dpo_sft": Style("#88CCEE", "d", "-", "DPO + SFT"),
    "table4/dpo_l": Style("#AA4499", "h", "-", "DPO-L"),
    "table4/dpo_l_sft": Style(OURS, "s", "-", "DPO-L + SFT"),
    # sweeps (one colour per swept quantity)
    "alpha": Style("#56B4E9", "o", "-", "α sweep"),  # not Shortest's orange: the sweep is Q-DYN at every α
    "epsilon": Style("#117733", "D", "-", "ε sweep"),
    "eta": Style("#AA4499", "h", "-", "η sweep"),
    "sign": Style("#332288", "<", "-", "sign sweep"),
    # the two halves of a preference pair and the two sides of a refinement
    "chosen": Style("#009E73", "o", "-", "chosen"),
    "rejected": Style("#CC79A7", "s", "-", "rejected"),
    "before": Style("#999999", "o", "-", "before"),
    "after": Style(OURS, "s", "-", "after"),
    "accepted": Style("#009E73", "o", "-", "accepted"),
}

# Model names as tables and results spell them -> palette keys.
_ALIASES = {
    "base model": "base", "base model (no training)": "base", "trained": "tokensqueeze", "ours": "tokensqueeze",
    "static": "static_mix", "static mix": "static_mix", "shortest": "table2/shortest", "q_fix": "table2/q_fix",
    "q_dyn": "table2/q_dyn", "q_dyn_extra": "table2/q_dyn_extra", "q-fix": "table2/q_fix", "q-dyn": "table2/q_dyn",
    "q-dyn + extra negatives": "table2/q_dyn_extra",
}
_FALLBACK = ("#7F7F7F", "#BCBD22", "#17BECF", "#8C564B")


def key_of(name: str) -> str:
    """The palette key of a model, row or variant name (a row name like 'table2/q_dyn', or a model like 'base')."""
    n = str(name).strip()
    if n in STYLES:
        return n
    low = n.lower()
    if low in STYLES:
        return low
    if low in _ALIASES:
        return _ALIASES[low]
    for k, s in STYLES.items():  # a label such as "Q-DYN" or "TokenSqueeze"
        if s.label.lower() == low:
            return k
    group = n.split("/", 1)[0]
    return group if group in STYLES else n


def style(name: str) -> Style:
    """The style of a model or variant; an unknown name gets a stable grey-ish fallback."""
    k = key_of(name)
    if k in STYLES:
        return STYLES[k]
    return Style(_FALLBACK[sum(map(ord, k)) % len(_FALLBACK)], "o", "-", str(name))
