"""Reading a profile file (profiles/<name>.yaml): strict YAML, every key and value checked against the dataclasses of
core/profile_schema.py, dotted overrides, and the checks that involve several keys."""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import typing
from pathlib import Path
from typing import Any

import yaml

from .pipeline import PIPELINE
from .profile_schema import AblationsConfig, Profile

# The repository (core.config re-exports it; the run and figure folders are found from that binding)
REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILES_DIR = REPO_ROOT / "profiles"

# A profile's name names its run and figure folders: one path component, no hidden or parent folder.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# The most values (scalars, list items, mapping entries) a profile may expand to: far above any real profile,
# far below what a YAML alias bomb ("billion laughs") expands to.
MAX_PROFILE_VALUES = 100_000


class ProfileError(ValueError):
    """A profile file is missing, malformed, or holds an unknown key or a bad value."""


def _check_value(value: Any, f: dataclasses.Field, hint: Any, where: str) -> Any:
    """Type- and range-check one scalar field value; return it (ints accepted for floats)."""
    expected = hint if hint in (int, float, str, bool, list, dict) else None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is not None:
        if expected is int and isinstance(value, bool):
            raise ProfileError(f"{where}: expected an integer, got {value!r}")
        if not isinstance(value, expected):
            raise ProfileError(f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    meta = f.metadata or {}
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ProfileError(f"{where}: {value!r} is not one of {list(meta['choices'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value:  # NaN
            raise ProfileError(f"{where}: NaN is not allowed")
        if meta.get("lo") is not None and meta.get("lo_open") and value <= meta["lo"]:
            raise ProfileError(f"{where}: {value!r} must be above {meta['lo']} "
                               f"(the range is ({meta['lo']}, {meta['hi']}])")
        if meta.get("lo") is not None and value < meta["lo"]:
            raise ProfileError(f"{where}: {value!r} is below the minimum {meta['lo']}")
        if meta.get("hi") is not None and value > meta["hi"]:
            raise ProfileError(f"{where}: {value!r} is above the maximum {meta['hi']}")
    return value


def _build(cls: type, raw: dict, where: str) -> Any:
    """Build a (nested) config dataclass from a dict, rejecting unknown keys."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ProfileError(f"{where}.{key}: unknown key (known: {', '.join(sorted(fields))})")
        f = fields[key]
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = _check_value(value, f, hint, f"{where}.{key}")
    return cls(**kwargs)


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value, cut to `limit` characters (an aliased list can be huge)."""
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate_cross(p: Profile, where: str) -> None:
    """Checks that involve several keys."""
    w = p.toyworld.phrasings
    if not (len(w) == 4 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                 and math.isfinite(x) and x >= 0 for x in w)
            and sum(w) > 0):
        raise ProfileError(f"{where}: toyworld.phrasings must be 4 non-negative weights with a positive sum, got {w!r}")
    _validate_ablations(p.ablations, where)
    for k, v in p.data.local_files.items():
        if not isinstance(k, str) or not k or not isinstance(v, str) or not v.strip():
            raise ProfileError(f"{where}: data.local_files maps a benchmark name to the path of a local JSONL file "
                               f"(a string), got {k!r}: {_short(v)} (write data.local_files: {{math500: "
                               "data/math500.jsonl}})")
    bad = [s for s in p.expensive if not isinstance(s, str) or s not in PIPELINE]
    if bad:
        raise ProfileError(f"{where}: expensive names unknown stages {bad!r}; stages: {', '.join(PIPELINE)}")
    if p.toyworld.k_min > p.toyworld.k_max:
        raise ProfileError(f"{where}: toyworld.k_min ({p.toyworld.k_min}) exceeds toyworld.k_max ({p.toyworld.k_max})")
    if p.pretrain.hidden_size % p.pretrain.num_heads:
        raise ProfileError(f"{where}: pretrain.hidden_size must be divisible by pretrain.num_heads")
    e = p.tldr.easy_max_k
    # easy_max_k splits the toy world's k range (TLDR runs on the toy world only: tldr.dev_problems refuses any other
    # training task), so it is checked against toyworld whatever data.train names; 0 (the default) is the midpoint
    if e and not p.toyworld.k_min <= e < p.toyworld.k_max:
        raise ProfileError(f"{where}: tldr.easy_max_k ({e}) must lie in [toyworld.k_min, toyworld.k_max - 1] = "
                           f"[{p.toyworld.k_min}, {p.toyworld.k_max - 1}] so that both TLDR pools have problems "
                           "(0: the midpoint)")
    if p.sampling.backend == "vllm" and p.device == "cpu":
        raise ProfileError(f"{where}: sampling.backend 'vllm' needs a GPU, but device is 'cpu' "
                           "(use device: auto or cuda, or sampling.backend: transformers)")
    longest = max(p.sampling.max_new_tokens, p.evaluation.max_new_tokens)
    if p.sampling.max_model_len and p.sampling.max_model_len <= longest:
        raise ProfileError(f"{where}: sampling.max_model_len ({p.sampling.max_model_len}) leaves no room for the "
                           "prompt: "
                           "it must exceed sampling.max_new_tokens and evaluation.max_new_tokens (0 derives it)")


def _validate_ablations(a: AblationsConfig, where: str) -> None:
    """The ablations section's lists: sweep points in range, headline entries non-empty strings."""
    for name, lo, hi in (("alphas", 0.0, 1.0), ("epsilons", 0.0, None), ("etas", 0.0, 1.0)):
        for v in getattr(a, name):
            number = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            if not number or v < lo or (hi is not None and v > hi):
                bound = f"[{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g} and finite"
                raise ProfileError(f"{where}.ablations.{name}: {v!r} is not a number {bound}")
    for v in a.headline:
        if not isinstance(v, str) or not v:
            raise ProfileError(f"{where}.ablations.headline: {v!r} is not a row or group name (a non-empty string)")


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping of a profile file names a key twice."""


class _ProfileLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter: a key given twice in one mapping is an error, and 1e-5 is a number."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKeyError(f"the key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                                             f"{key_node.start_mark.line + 1}); YAML would silently keep only the last")
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 1e-5 (no dot) as a string; accept the exponent forms Python's float() does.
_ProfileLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _count_values(obj: Any, limit: int) -> int:
    """Values in a loaded YAML tree, counting shared (aliased) nodes each time they appear; stops past `limit`."""
    n, stack = 0, [obj]
    while stack:
        x = stack.pop()
        n += 1
        if n > limit:
            return n
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return n


def read_profile_yaml(path: Path) -> dict:
    """The mapping a profile file holds; ProfileError for invalid YAML, duplicate keys, an empty file or an alias
    bomb."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read the profile ({e})") from e
    try:
        raw = yaml.load(text, Loader=_ProfileLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKeyError as e:
        raise ProfileError(f"{path}: {e}") from e
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML ({e})") from e
    if raw is None:
        raise ProfileError(f"{path}: the profile is empty; a profile file needs at least one key "
                           "(copy profiles/toy.yaml or profiles/ci.yaml as a start)")
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a mapping at the top level")
    if _count_values(raw, MAX_PROFILE_VALUES) > MAX_PROFILE_VALUES:
        raise ProfileError(f"{path}: the profile expands to more than {MAX_PROFILE_VALUES} values "
                           "(YAML aliases that repeat each other?); write the values out")
    return raw


def _check_name(raw: dict, path: Path) -> None:
    """The profile's name (its run and figure folders): a safe single folder name equal to the file's stem."""
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not SAFE_NAME.match(name) or ".." in name:
        raise ProfileError(f"{path}: name {name!r} is not a safe folder name (letters, digits, '.', '_', '-'; "
                           "it names the run folder runs/<name>/ and the figure folder figures/<name>/)")
    if name != path.stem:
        raise ProfileError(f"{path}: name {name!r} differs from the file name {path.name!r}: the run folder is named "
                           f"after the profile, so a profile's name is its file's stem; drop the name key "
                           f"or rename the file to {name}.yaml")


def available_profiles() -> list[str]:
    """Names of the profiles shipped under profiles/."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str, overrides: dict | None = None) -> Profile:
    """Load and validate a profile by name (profiles/<name>.yaml) or path, applying dotted overrides."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ProfileError(
            f"unknown profile {name_or_path!r}: no file {path}; available: {', '.join(available_profiles())}"
        )
    raw = read_profile_yaml(path)
    _check_name(raw, path)
    raw.setdefault("name", path.stem)
    for dotted, value in (overrides or {}).items():
        if dotted == "name":
            raise ProfileError(f"override {dotted!r}: a profile's name is its file's stem and cannot be overridden")
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ProfileError(f"override {dotted!r}: {part!r} is not a section")
        node[parts[-1]] = value
    prof = _build(Profile, raw, str(path))
    prof.source_file = str(path)
    _validate_cross(prof, str(path))
    return prof
