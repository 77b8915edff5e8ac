"""The profile reference, docs/profiles.md: every profile key with its type, default, range, reason and the stages
that read it, rendered from the dataclasses of core/profile_schema.py (scripts/render_docs.py writes the page)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from .pipeline import PIPELINE, reads_key
from .profile_loader import REPO_ROOT
from .profile_schema import Profile

PROFILES_DOC = REPO_ROOT / "docs" / "profiles.md"


def profile_fields() -> list[tuple[str, dataclasses.Field, Any, str]]:
    """Every profile key, in definition order: (dotted key, its field, its type hint, its section's docstring)."""
    out = []
    hints = typing.get_type_hints(Profile)
    for f in dataclasses.fields(Profile):
        if f.name == "source_file":
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            cls = hints[f.name]
            sub_hints = typing.get_type_hints(cls)
            out += [(f"{f.name}.{g.name}", g, sub_hints[g.name], cls.__doc__ or "") for g in dataclasses.fields(cls)]
        else:
            out.append((f.name, f, hints[f.name], Profile.__doc__ or ""))
    return out


def _doc_value(v: Any) -> str:
    """A default as a profile file spells it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def _doc_number(x: float) -> str:
    """A range bound, readable (thousands separated)."""
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _doc_allowed(f: dataclasses.Field, hint: Any) -> str:
    """The values a field accepts, from its metadata (lists say theirs in the help text)."""
    meta = f.metadata or {}
    if meta.get("choices") is not None:
        return ", ".join(_doc_value(c) for c in meta["choices"])
    if hint is bool:
        return "true, false"
    if meta.get("lo") is not None or meta.get("hi") is not None:
        left = "(" if meta.get("lo_open") else "["
        return f"{left}{_doc_number(meta['lo'])}, {_doc_number(meta['hi'])}]"
    return "any"


def _doc_default(f: dataclasses.Field) -> str:
    """A field's default as a code span, or what stands in for it."""
    if f.default is not dataclasses.MISSING:
        return f"`{_doc_value(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{_doc_value(f.default_factory())}`"
    return "the file's stem"


def profile_reference() -> str:
    """docs/profiles.md: every profile key with its type, default, allowed values, help text and reading stages."""
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = [
        "# Profile reference",
        "",
        "<!-- Generated from tsq_utils/core/profile_schema.py by `python scripts/render_docs.py` (or",
        "     `python -m tsq_utils.core.config --doc > docs/profiles.md`); do not edit by hand: tests/test_docs.py",
        "     fails when this page and the code differ. -->",
        "",
        "A profile (`profiles/<name>.yaml`) sets any of the keys below; a key it leaves out keeps the default. "
        "Each key is defined, with its range and the reason it exists, once: in the dataclasses of "
        "`tsq_utils/core/profile_schema.py`, which this page is rendered from. The profile files say only why they "
        "pick their values. A notebook parameter (`./run_all.sh -p NAME VALUE`, or the notebook's parameters cell) "
        "overrides one of these keys for one run; the parameters cell names the key it overrides.",
        "",
        "**Read by** lists the notebooks whose stage reads the key (the stage table in `tsq_utils/core/pipeline.py`): "
        "editing the key reruns those stages on the next run, and the stages downstream of them when their outputs "
        "change; an edit to a key no stage reads reruns nothing.",
    ]
    section = None
    for dotted, f, hint, doc in profile_fields():
        head = dotted.split(".")[0] if "." in dotted else ""
        if head != section:
            section = head
            title = f"`{head}`" if head else "Top level"
            lines += ["", f"## {title}", "", cell(doc), "",
                      "| key | type | default | allowed | what it does, and why | read by |",
                      "|---|---|---|---|---|---|"]
        readers = [s.notebook[:2] for s in PIPELINE.values() if reads_key(s.name, dotted)]
        lines.append(f"| `{dotted}` | {hint.__name__} | {_doc_default(f)} | {cell(_doc_allowed(f, hint))} | "
                     f"{cell(f.metadata.get('help', ''))} | {' '.join(readers) or 'none'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m tsq_utils.core.config --doc`: print docs/profiles.md."""
    ap = argparse.ArgumentParser(prog="python -m tsq_utils.core.config", description=main.__doc__)
    ap.add_argument("--doc", action="store_true", help="print the profile reference (docs/profiles.md) to stdout")
    args = ap.parse_args(argv)
    if not args.doc:
        ap.print_help()
        return 2
    print(profile_reference(), end="")
    return 0
