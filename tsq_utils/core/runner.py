"""run_all.sh's Python side: check every -p parameter before anything runs, and describe a failed or interrupted
notebook.

Parameters. Each notebook declares its knobs in its ``parameters`` cell and passes them to ``setup_stage``
under a dotted profile key ({"training.eta": eta}); that mapping is read here from the notebook itself
(with ``ast``, nothing is executed but the value expression of a key that transforms its parameter, such
as ``registry.benchmark_list(eval_sets)``). A ``-p NAME VALUE`` goes to the notebooks of the run whose
parameters cell defines NAME, and only to them. It is refused, before any notebook runs, when

- no notebook of the run defines NAME (the message names the closest known parameter),
- the notebooks of the run read NAME differently (``eta`` is ``training.eta`` in 04 and ``tldr.eta`` in
  07): then ``-p 04:eta VALUE`` sends it to one notebook (the per-stage sizes in SHARED_MEANING, such as
  ``n_samples`` in 01 and 05, are one notion and go to every notebook that has them),
- the value is out of the profile key's range or of the wrong type (checked with the real profile loader,
  after papermill's own reading of the value: True/False/None, int, float, else a string), or of another
  type than a parameter's non-None default.

CLI (used by run_all.sh):
  python -m tsq_utils.core.runner check PROFILE_YAML N NB_1 .. NB_N KEY_1 VALUE_1 ...
      prints one line per notebook: its file name, then the indices (0-based) of the -p pairs it gets;
      exit 2 with the reasons on stderr when a parameter is refused.
  python -m tsq_utils.core.runner describe EXECUTED_NB [interrupted] [died]
      prints "cell N (In [k]): Error: message" for the failing cell (or the interrupted one, or with `died` the one
      that ran when the kernel was killed).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ProfileError, load_profile

# papermill's reading of a -p value (papermill.cli._resolve_type), so the check sees what the notebook gets.
_INT = re.compile(r"^[-+]?\d+$")

# Names that mean the same in every notebook that has them: force (no profile key backs it), and the per-stage
# sizes, which each notebook applies to its own generations under its own section (01: sampling.*, 05:
# evaluation.*), the same notion, so `-p n_samples 2` over 00-05 sets both, as a user means it. Names whose
# notebooks read them as different things (eta: 04's SFT weight, 07's step size; lr; max_steps) are not here.
SHARED_MEANING = {
    "force": "rerun the stage even if it is up to date",
    "n_problems": "each stage's number of problems",
    "n_samples": "each stage's samples per problem",
    "max_new_tokens": "each stage's generation length",
    "temperature": "each stage's sampling temperature",
}

# Cells papermill adds to an executed notebook (not part of the source notebook's numbering).
_PAPERMILL_CELLS = {"injected-parameters", "papermill-error-cell-tag"}


# Parameters that no profile key backs and whose default (None) says nothing of their type: what each takes.
# (A -p value is a bool, an int, a float or a string, as papermill reads it.)
PARAM_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "rows": ((str,), "a row or group name of notebook 06 (e.g. -p rows table4/dpo, or -p rows alpha)"),
    "trained_model": ((str,), "a local model folder (e.g. -p trained_model runs/toy/training/model)"),
}

# What two registries know, restated for core, which imports no higher layer: the tasks whose problems are built
# from code and read no files (task/registry.py's TASKS), and the model sources that read model.local_override
# (model/base_model.py's MODEL_SOURCES). tests/test_house.py checks both against the registries.
CODE_BUILT_TASKS = frozenset({"toy"})
LOCAL_OVERRIDE_SOURCES = frozenset({"hub"})


# Profile keys a -p sets that some profiles never read: key -> (does this profile read it?, why not, when it
# does). A -p that would change nothing is refused rather than silently ignored.
def _reads_benchmarks(p) -> bool:
    return not CODE_BUILT_TASKS.issuperset([p.data.train, *p.data.eval])


UNREAD_UNLESS: dict[str, tuple[Any, str]] = {
    "data.local_dir": (_reads_benchmarks, "its training and evaluation sets are the toy world, built from code"),
    "data.local_files": (_reads_benchmarks, "its training and evaluation sets are the toy world, built from code"),
    "model.local_override": (lambda p: p.model.source in LOCAL_OVERRIDE_SOURCES,
                             "its model is not a hub model (model.source toy)"),
}


class ParameterError(ValueError):
    """A -p parameter that no notebook of the run can take as given; the message says why and what to pass."""


def resolve_value(text: str) -> Any:
    """A -p value as papermill reads it: True, False, None, an int, a float, else the string itself."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    if _INT.match(text.strip()):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


@dataclass
class Param:
    """One knob of a notebook's parameters cell."""

    notebook: str  # file name, e.g. 04_dpo_l_training.ipynb
    name: str
    default: Any  # the literal default (None when it is not a literal)
    key: str | None  # the dotted profile key setup_stage gets it as, or None (recorded only)
    expr: ast.expr | None = None  # the value expression in the setup_stage dict when it is not the bare name
    imports: tuple[tuple[str, str], ...] = ()  # (name, tsq_utils module) the setup cell imports, for evaluating expr

    @property
    def number(self) -> str:
        return self.notebook[:2]

    @property
    def meaning(self) -> str:
        if self.name in SHARED_MEANING:
            return SHARED_MEANING[self.name]
        return self.key or f"notebook {self.number}'s own {self.name}"


def _code_cells(nb: dict) -> list[tuple[list[str], str]]:
    out = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            src = cell.get("source", "")
            out.append((cell.get("metadata", {}).get("tags", []), "".join(src) if isinstance(src, list) else src))
    return out


def notebook_params(path: str | Path) -> dict[str, Param]:
    """The parameters of a notebook: name -> Param (default, and the profile key setup_stage reads it as)."""
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = _code_cells(nb)
    params: dict[str, Param] = {}
    for tags, src in cells:
        if "parameters" not in tags:
            continue
        for node in ast.parse(src).body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        try:
                            default = ast.literal_eval(node.value)
                        except ValueError:
                            default = None
                        params[target.id] = Param(path.name, target.id, default, None)
        break
    for _, src in cells:
        if "setup_stage(" not in src:
            continue
        tree = ast.parse(src)
        imports = tuple((a.asname or a.name, f"{n.module}.{a.name}") for n in ast.walk(tree)
                        if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "tsq_utils"
                        for a in n.names)
        for call in ast.walk(tree):
            func = getattr(call.func, "id", getattr(call.func, "attr", None)) if isinstance(call, ast.Call) else None
            if func != "setup_stage":
                continue
            mapping = (call.args[2] if len(call.args) > 2
                       else next((k.value for k in call.keywords if k.arg == "params"), None))
            if not isinstance(mapping, ast.Dict):
                continue
            for k, v in zip(mapping.keys, mapping.values):
                if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                    continue
                names = {n.id for n in ast.walk(v) if isinstance(n, ast.Name)} & params.keys()
                for name in names:
                    if "." in k.value:
                        params[name].key = k.value
                        params[name].expr = None if isinstance(v, ast.Name) else v
                        params[name].imports = imports
    return params


def _evaluate(p: Param, value: Any) -> Any:
    """The value setup_stage gets for a parameter whose setup_stage entry transforms it (e.g. a comma list)."""
    if p.expr is None:
        return value
    namespace = {}
    for name, module in p.imports:
        try:
            namespace[name] = importlib.import_module(module)
        except ModuleNotFoundError:  # `from tsq_utils.x import some_function`: not a module, not needed here
            continue
    namespace[p.name] = value
    return eval(compile(ast.Expression(p.expr), p.notebook, "eval"), namespace)  # noqa: S307 - our own notebook's code


def _type_ok(default: Any, value: Any) -> bool:
    """True when a value suits a parameter whose literal default is `default` (None accepts anything)."""
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _route(raw_key: str, raw_value: str, nbs: dict[str, dict[str, Param]], others: dict[str, dict[str, Param]]
           ) -> tuple[list[str], str | None]:
    """The notebooks of the run a -p pair goes to (KEY may be NN:name), or an error saying why it goes nowhere."""
    by_number = {name[:2]: name for name in nbs}
    prefix, _, name = raw_key.rpartition(":")
    shown = f"-p {raw_key} {raw_value}"
    if prefix:
        if prefix not in by_number:
            return [], f"{shown}: notebook {prefix} is not part of this run (notebooks: {', '.join(sorted(by_number))})"
        if name not in nbs[by_number[prefix]]:
            known = sorted(nbs[by_number[prefix]])
            close = difflib.get_close_matches(name, known, n=1)
            return [], (f"{shown}: {by_number[prefix]} has no parameter {name!r}"
                        + (f"; did you mean {close[0]!r}?" if close else f" (its parameters: {', '.join(known)})"))
        return [by_number[prefix]], None
    targets = [nb for nb, ps in nbs.items() if name in ps]
    if targets:
        return targets, None
    elsewhere = sorted(nb[:2] for nb, ps in others.items() if name in ps)
    if elsewhere:
        return [], (f"{shown}: no notebook of this run has a parameter {name!r}; only notebook(s) "
                    f"{', '.join(elsewhere)} do, which this run leaves out (--only)")
    known = sorted({n for ps in [*nbs.values(), *others.values()] for n in ps} - {"profile"})
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return [], (f"{shown}: no notebook has a parameter {name!r}"
                + (f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"))


def _check_pair(raw_key: str, raw_value: str, targets: list[str], nbs: dict[str, dict[str, Param]]) -> str | None:
    """Why a routed -p pair is refused before the profile loader sees it (notebooks that read it differently, a value
    of another type than the parameter's), else None."""
    name = raw_key.rpartition(":")[2]
    shown = f"-p {raw_key} {raw_value}"
    meanings: dict[str, list[str]] = {}
    for nb in targets:
        meanings.setdefault(nbs[nb][name].meaning, []).append(nb[:2])
    if len(meanings) > 1:
        read = "; ".join(f"{', '.join(nums)} as {m}" for m, nums in meanings.items())
        return (f"{shown}: the notebooks of this run read {name!r} differently ({read}); say which one: "
                + " or ".join(" ".join(f"-p {n}:{name} {raw_value}" for n in nums) for nums in meanings.values()))
    value = resolve_value(raw_value)
    p = nbs[targets[0]][name]
    if p.key is None and not _type_ok(p.default, value):
        return (f"{shown}: {name} expects a {type(p.default).__name__} like its default {p.default!r}, "
                f"got {type(value).__name__} {value!r}")
    if p.key is None and p.default is None and name in PARAM_TYPES and value is not None:
        types, what = PARAM_TYPES[name]
        if not isinstance(value, types) or isinstance(value, bool) or not str(value).strip():
            return f"{shown}: {name} takes {what}, got {type(value).__name__} {value!r}"
    return None


def _check_profile_values(profile: str, nbs: dict[str, dict[str, Param]], gets: dict[str, list[int]],
                          pairs: list[tuple[str, str]]) -> list[str]:
    """The values of profile keys checked by the real loader, once per notebook with everything that notebook gets;
    the errors (a value out of range, or one the profile never reads)."""
    errors: list[str] = []
    for nb, idx in gets.items():
        overrides, given = {}, []
        for i in idx:
            raw_key, raw_value = pairs[i]
            p = nbs[nb][raw_key.rpartition(":")[2]]
            if p.key is None:
                continue
            try:
                value = _evaluate(p, resolve_value(raw_value))
            except Exception as e:  # noqa: BLE001 - the notebook's own conversion refused it
                errors.append(f"-p {raw_key} {raw_value}: {nb} cannot use it ({e})")
                continue
            if value is not None:
                overrides[p.key] = value
                given.append(f"-p {raw_key} {raw_value} ({p.key})")
        if not overrides:
            continue
        try:
            prof = load_profile(profile, overrides)
        except ProfileError as e:
            errors.append(f"{', '.join(given)}: not valid for {nb}: {e}")
            continue
        for key, (reads, why) in UNREAD_UNLESS.items():
            if key in overrides and not reads(prof):
                shown = next(g for g in given if g.endswith(f"({key})"))
                message = (f"{shown}: profile {prof.name} never reads {key} ({why}), so it would change "
                           "nothing: leave it out, or use it with a profile that reads it (r1-1.5b, r1-7b)")
                if message not in errors:
                    errors.append(message)
    return errors


def plan(profile: str, notebooks: list[str | Path], pairs: list[tuple[str, str]],
         all_notebooks: list[str | Path] | None = None) -> dict[str, list[int]]:
    """Which -p pairs each notebook gets: {notebook file name: [pair index, ...]}; ParameterError when one is refused.

    `pairs` are (KEY, VALUE) as typed (KEY may be NN:name); `all_notebooks` (default: `notebooks`) lets an
    error say that a name belongs to a notebook outside this run.
    """
    load_profile(profile)  # the profile itself first: its errors name the file and key
    nbs = {Path(nb).name: notebook_params(nb) for nb in notebooks}
    others = {Path(nb).name: notebook_params(nb) for nb in (all_notebooks or []) if Path(nb).name not in nbs}
    errors: list[str] = []
    gets: dict[str, list[int]] = {name: [] for name in nbs}
    for i, (raw_key, raw_value) in enumerate(pairs):
        targets, error = _route(raw_key, raw_value, nbs, others)
        error = error or _check_pair(raw_key, raw_value, targets, nbs)
        if error:
            errors.append(error)
            continue
        for nb in targets:
            gets[nb].append(i)
    if not errors:
        errors = _check_profile_values(profile, nbs, gets, pairs)
    if errors:
        raise ParameterError("\n".join(errors))
    return gets


def describe(executed: str | Path, interrupted: bool = False, died: bool = False) -> str:
    """The failing (or, if interrupted, the running) cell of an executed notebook: "cell N (In [k]): ..."; "" if none.

    N counts the source notebook's cells (markdown included), so it matches what the user sees in Jupyter.
    """
    try:
        nb = json.loads(Path(executed).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    n = 0
    pending_at = None
    last_started = None  # (cell number, execution count, first line) of the last cell that started
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {})
        if _PAPERMILL_CELLS & set(meta.get("tags", [])):
            continue
        n += 1
        if cell.get("cell_type") != "code":
            continue
        first = next((line for line in "".join(cell.get("source", "")).splitlines() if line.strip()), "")
        where = f"cell {n} (In [{cell.get('execution_count') or ' '}])"
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        pm = meta.get("papermill", {})
        status = pm.get("status")
        if pm.get("start_time"):
            last_started = (n, cell.get("execution_count"), first)
        if errors or pm.get("exception") or status == "failed":
            if errors:
                e = errors[0]
                msg = f"{e.get('ename')}: {e.get('evalue')}"
                if e.get("ename") == "KeyboardInterrupt":
                    interrupted = True
            else:
                msg = "the cell did not finish (the kernel may have died)"
            if interrupted:
                count = cell.get("execution_count") or " "
                return f"interrupted at cell {n} (In [{count}])\n  cell starts: {first[:100]}"
            return f"{where}: {msg}\n  cell starts: {first[:100]}"
        if status == "running":
            state = "interrupted at" if interrupted else "stopped in"
            return f"{state} cell {n} (In [{cell.get('execution_count') or ' '}])\n  cell starts: {first[:100]}"
        if status == "pending" and pending_at is None:
            pending_at = (n, first)
    if interrupted and pending_at:
        return f"interrupted before cell {pending_at[0]}\n  cell starts: {pending_at[1][:100]}"
    if died and last_started:
        # a killed kernel (SIGKILL, the out-of-memory killer) leaves no error: papermill marks the cell it was
        # running completed, and the cells after it unstarted
        n_at, count, first = last_started
        state = "interrupted at" if interrupted else "the kernel died in"
        return (f"{state} cell {n_at} (In [{count or ' '}]) (killed, e.g. by the out-of-memory killer: see dmesg; "
                f"more memory, or smaller sizes)\n  cell starts: {first[:100]}")
    return ""


def main(argv: list[str]) -> int:
    """The CLI (see the module doc)."""
    if argv[:1] == ["check"] and len(argv) >= 3:
        profile, n = argv[1], int(argv[2])
        notebooks, rest = argv[3:3 + n], argv[3 + n:]
        if len(rest) % 2:
            print("runner check: KEY VALUE pairs expected", file=sys.stderr)
            return 2
        all_nbs = sorted(Path(notebooks[0]).parent.glob("[0-9][0-9]_*.ipynb")) if notebooks else []
        try:
            gets = plan(profile, notebooks, list(zip(rest[::2], rest[1::2])), all_notebooks=all_nbs)
        except ParameterError as e:
            print(str(e), file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - a profile error or an unreadable notebook: say it, exit non-zero
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            return 2
        for nb, idx in gets.items():
            print(" ".join([nb, *map(str, idx)]))
        return 0
    if argv[:1] == ["describe"] and len(argv) >= 2:
        print(describe(argv[1], interrupted="interrupted" in argv[2:], died="died" in argv[2:]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
