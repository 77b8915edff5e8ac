"""Profiles (YAML files under profiles/), run folders, seeds and thread counts."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = REPO_ROOT / "profiles"

# A profile's name names its run and figure folders: one path component, no hidden or parent folder.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# The most values (scalars, list items, mapping entries) a profile may expand to: far above any real profile,
# far below what a YAML alias bomb ("billion laughs") expands to.
MAX_PROFILE_VALUES = 100_000


class ProfileError(ValueError):
    """A profile file is missing, malformed, or holds an unknown key or a bad value."""


def _rng(lo: float | None = None, hi: float | None = None, choices: tuple | None = None, lo_open: bool = False) -> dict:
    """Field metadata: a range (inclusive; lo_open excludes lo) or a set of allowed values."""
    return {"lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open}


@dataclass
class ModelConfig:
    source: str = field(default="toy", metadata=_rng(choices=("toy", "hub")))
    # toy: a folder relative to the repo (the shipped reasoner); hub: a hub id or a local path
    path: str = "checkpoints/toy-reasoner"
    dtype: str = field(default="float32", metadata=_rng(choices=("float32", "bfloat16", "float16")))
    # a local directory that replaces the hub model (offline runs, tests)
    local_override: str = ""


@dataclass
class ToyWorldConfig:
    k_min: int = field(default=2, metadata=_rng(2, 8))
    k_max: int = field(default=8, metadata=_rng(2, 8))
    max_value: int = field(default=49, metadata=_rng(9, 99))
    # share of teacher traces written in the concise (oracle-like) style; the rest overthink
    p_concise: float = field(default=0.25, metadata=_rng(0.0, 1.0))
    p_verbose_step: float = field(default=0.75, metadata=_rng(0.0, 1.0))
    p_check: float = field(default=0.4, metadata=_rng(0.0, 1.0))
    p_slip: float = field(default=0.08, metadata=_rng(0.0, 1.0))
    p_review: float = field(default=0.5, metadata=_rng(0.0, 1.0))


@dataclass
class PretrainConfig:
    retrain: bool = False
    hidden_size: int = field(default=128, metadata=_rng(16, 4096))
    num_layers: int = field(default=4, metadata=_rng(1, 64))
    num_heads: int = field(default=4, metadata=_rng(1, 64))
    intermediate_size: int = field(default=512, metadata=_rng(16, 16384))
    vocab_size: int = field(default=512, metadata=_rng(64, 65536))
    block_size: int = field(default=512, metadata=_rng(32, 8192))
    n_tokens: int = field(default=14_000_000, metadata=_rng(1000, 10**10))
    batch_size: int = field(default=16, metadata=_rng(1, 4096))
    lr: float = field(default=3e-3, metadata=_rng(1e-7, 1.0))
    warmup_ratio: float = field(default=0.02, metadata=_rng(0.0, 0.5))
    weight_decay: float = field(default=0.1, metadata=_rng(0.0, 1.0))
    n_tokenizer_docs: int = field(default=20000, metadata=_rng(100, 10**7))


@dataclass
class DataConfig:
    # toy: the toy world; otherwise a benchmark name (math500, aime24, aime25, gsm8k, amc23, ...)
    train: str = "toy"
    eval: list = field(default_factory=lambda: ["toy"])
    n_train_problems: int = field(default=400, metadata=_rng(1, 10**7))
    n_eval_problems: int = field(default=400, metadata=_rng(1, 10**7))
    # benchmark name -> local JSONL path that replaces the hub dataset
    local_files: dict = field(default_factory=dict)
    # a folder holding local copies of the benchmarks under their data.BENCHMARKS file names (the layout of
    # ../shared/data); used for every benchmark without a local_files entry. "" = the hub. Relative paths in
    # local_files and local_dir are resolved against the repository root.
    local_dir: str = ""


@dataclass
class SamplingConfig:
    backend: str = field(default="transformers", metadata=_rng(choices=("transformers", "vllm")))
    n: int = field(default=8, metadata=_rng(1, 4096))
    temperature: float = field(default=1.0, metadata=_rng(0.0, 5.0))
    top_p: float = field(default=1.0, metadata=_rng(0.0, 1.0, lo_open=True))
    max_new_tokens: int = field(default=512, metadata=_rng(1, 10**6))
    batch_size: int = field(default=64, metadata=_rng(1, 100000))
    # vLLM engine settings (backend vllm only): the share of GPU memory the engine may take (weights + KV cache),
    # GPUs per engine, and the context length (0 = the longest generation asked for plus room for the prompt)
    gpu_memory_utilization: float = field(default=0.85, metadata=_rng(0.05, 1.0))
    tensor_parallel_size: int = field(default=1, metadata=_rng(1, 64))
    # vLLM engines side by side (backend vllm only), each on tensor_parallel_size GPUs of its own: notebooks 01 and 05
    # shard their prompts over them and merge the results (the same samples as one engine: seeds are per request)
    data_parallel_size: int = field(default=1, metadata=_rng(1, 64))
    max_model_len: int = field(default=0, metadata=_rng(0, 10**7))


@dataclass
class SelectionConfig:
    variant: str = field(default="q_dyn", metadata=_rng(choices=("shortest", "q_fix", "q_dyn", "q_dyn_extra")))
    alpha: float = field(default=0.2, metadata=_rng(0.0, 1.0))
    q_fix: float = field(default=0.2, metadata=_rng(0.0, 1.0))
    max_pairs: int = field(default=64, metadata=_rng(1, 100000))
    extra_neg_ratio: float = field(default=1.5, metadata=_rng(1.0, 100.0))


@dataclass
class RefinementConfig:
    enabled: bool = True
    n_candidates: int = field(default=16, metadata=_rng(1, 4096))
    window: int = field(default=512, metadata=_rng(1, 100000))
    epsilon: float = field(default=0.005, metadata=_rng(0.0, 1e6))
    kl_reduction: str = field(default="mean", metadata=_rng(choices=("mean", "sum")))
    temperature: float = field(default=1.0, metadata=_rng(0.0, 5.0))
    max_step_tokens: int = field(default=128, metadata=_rng(1, 100000))
    max_responses: int = field(default=0, metadata=_rng(0, 10**7))  # 0 = all
    batch_size: int = field(default=16, metadata=_rng(1, 100000))
    # How candidates are KL-scored: "full" scores every shorter candidate exactly (06 re-thresholds its
    # log); "fast" scores length groups shortest first and rejects early on partial sums (same accept
    # decisions, KLs of rejected candidates are lower bounds); "reference" is the original slow path.
    scoring: str = field(default="full", metadata=_rng(choices=("full", "fast", "reference")))
    # Where candidates come from: "sampler" (the generation backend, one batch per group), "branch"
    # (decoded from each response's own KV cache) or "vllm" (one n=K request per step, prefix caching).
    candidates: str = field(default="sampler", metadata=_rng(choices=("sampler", "branch", "vllm")))
    # How steps are cut: "segments" (text split at blank lines, each piece tokenized alone) or "spans"
    # (token spans of the whole response's own tokenization: what the model really produced; GPU profiles).
    steps: str = field(default="segments", metadata=_rng(choices=("segments", "spans")))


@dataclass
class TrainingConfig:
    beta: float = field(default=0.1, metadata=_rng(0.0, 100.0, lo_open=True))
    lam: float = field(default=1.0, metadata=_rng(0.0, 100.0))
    eta: float = field(default=0.5, metadata=_rng(0.0, 1.0))
    length_margin_sign: int = field(default=-1, metadata=_rng(choices=(-1, 1)))
    lr: float = field(default=1e-5, metadata=_rng(0.0, 1.0, lo_open=True))
    epochs: float = field(default=1.0, metadata=_rng(0.0, 1000.0, lo_open=True))
    batch_size: int = field(default=8, metadata=_rng(1, 100000))
    grad_accum: int = field(default=1, metadata=_rng(1, 100000))
    warmup_ratio: float = field(default=0.1, metadata=_rng(0.0, 1.0))
    max_length: int = field(default=1024, metadata=_rng(16, 10**6))
    bf16: bool = False
    gradient_checkpointing: bool = False
    # scale-out (notebook 04): processes (one per GPU) training runs in; > 1 launches tsq_utils.train_entry through
    # `accelerate launch --config_file configs/accelerate/<accelerate_config>.yaml`. The global batch is
    # batch_size x grad_accum x num_processes
    num_processes: int = field(default=1, metadata=_rng(1, 1024))
    accelerate_config: str = field(default="ddp", metadata=_rng(choices=("ddp", "zero2", "zero3", "fsdp2")))
    # a trainer checkpoint every save_steps optimizer steps (0: none); a rerun of the same training resumes from it
    save_steps: int = field(default=0, metadata=_rng(0, 10**7))


@dataclass
class EvaluationConfig:
    n_samples: int = field(default=4, metadata=_rng(1, 4096))
    temperature: float = field(default=1.0, metadata=_rng(0.0, 5.0))
    top_p: float = field(default=1.0, metadata=_rng(0.0, 1.0, lo_open=True))
    max_new_tokens: int = field(default=512, metadata=_rng(1, 10**6))
    budget: int = field(default=512, metadata=_rng(1, 10**7))


@dataclass
class TLDRConfig:
    update_every: int = field(default=32, metadata=_rng(1, 10**9))
    eta: float = field(default=4.0, metadata=_rng(0.0, 1000.0))
    smoothing: float = field(default=1e-4, metadata=_rng(0.0, 1.0))
    acc_floor: float = field(default=0.7, metadata=_rng(0.0, 1.0))
    lr: float = field(default=1e-5, metadata=_rng(0.0, 1.0, lo_open=True))
    max_steps: int = field(default=200, metadata=_rng(1, 10**7))
    batch_size: int = field(default=8, metadata=_rng(1, 100000))
    n_dev_problems: int = field(default=100, metadata=_rng(1, 10**7))
    # toy world: problems with k <= easy_max_k are easy (System-1 pool), the others hard (System-2); 0 = the midpoint
    # of the k range
    easy_max_k: int = field(default=0, metadata=_rng(0, 1000))
    # decoding of the dev evaluations during training (choice: greedy, deterministic and cheap; the paper is silent)
    dev_temperature: float = field(default=0.0, metadata=_rng(0.0, 5.0))
    # floor |T_L - T_S| at 1 token and |A_L - A_S| at one dev problem (the dev set's resolution), so that coinciding
    # reference points do not divide by zero; a no-op when they are apart. False: the paper's raw rule
    floor_gaps: bool = True


@dataclass
class AblationsConfig:
    """Notebook 06: which sweep points run, how many training seeds the headline rows get, and the evaluation size."""

    # training seeds of the headline rows (mean ± SD over them); every other row trains with seed 0 only
    seeds: int = field(default=3, metadata=_rng(1, 100))
    # rows ("table4/dpo") or whole groups ("table4") that are trained with every seed
    headline: list = field(default_factory=lambda: ["table2/shortest", "table2/q_dyn", "table3/kl", "table4/dpo"])
    # sweep points; the profile's own value is always added (and, for epsilon, the no-KL rewrite, epsilon = inf).
    # Every epsilon point is a full refinement run (notebook 03's cost); alpha and eta points cost one training each.
    alphas: list = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 1.0])
    epsilons: list = field(default_factory=lambda: [0.05])
    etas: list = field(default_factory=lambda: [0.0, 0.75, 1.0])
    # evaluation of each row: the first n_eval_problems problems of each benchmark x n_eval_samples responses
    # (0 = notebook 05's sizes: data.n_eval_problems, evaluation.n_samples)
    n_eval_problems: int = field(default=140, metadata=_rng(0, 10**7))
    n_eval_samples: int = field(default=1, metadata=_rng(0, 4096))
    # optimizer steps per trained row (0 = training.epochs in full, as notebook 04)
    max_steps: int = field(default=0, metadata=_rng(0, 10**7))
    # pairs per optimizer step of every trained row (0 = training.batch_size, as notebook 04)
    batch_size: int = field(default=0, metadata=_rng(0, 10**6))
    # learning rate of every trained row (0 = training.lr): a row trained for far fewer steps than notebook 04 gets
    # further with a larger rate, and lands nearer where 04's full training does
    lr: float = field(default=0.0, metadata=_rng(0.0, 1.0))


@dataclass
class Profile:
    name: str
    description: str = ""
    seed: int = field(default=1234, metadata=_rng(0, 2**31 - 1))
    threads: int = field(default=1, metadata=_rng(0, 1024))  # 0 = leave torch's default
    device: str = field(default="cpu", metadata=_rng(choices=("cpu", "cuda", "auto")))
    model: ModelConfig = field(default_factory=ModelConfig)
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    refinement: RefinementConfig = field(default_factory=RefinementConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tldr: TLDRConfig = field(default_factory=TLDRConfig)
    ablations: AblationsConfig = field(default_factory=AblationsConfig)
    source_file: str = ""

    def to_dict(self) -> dict:
        """The profile as plain data (for manifests)."""
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        return d


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
            raise ProfileError(f"{where}: {value!r} must be above {meta['lo']} (the range is ({meta['lo']}, {meta['hi']}])")
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


def _validate_cross(p: Profile, where: str) -> None:
    """Checks that involve several keys."""
    _validate_ablations(p.ablations, where)
    if p.toyworld.k_min > p.toyworld.k_max:
        raise ProfileError(f"{where}: toyworld.k_min ({p.toyworld.k_min}) exceeds toyworld.k_max ({p.toyworld.k_max})")
    if p.pretrain.hidden_size % p.pretrain.num_heads:
        raise ProfileError(f"{where}: pretrain.hidden_size must be divisible by pretrain.num_heads")
    e = p.tldr.easy_max_k
    if e and p.data.train == "toy" and not p.toyworld.k_min <= e < p.toyworld.k_max:
        raise ProfileError(f"{where}: tldr.easy_max_k ({e}) must lie in [toyworld.k_min, toyworld.k_max - 1] = "
                           f"[{p.toyworld.k_min}, {p.toyworld.k_max - 1}] so that both TLDR pools have problems (0: the midpoint)")
    if p.sampling.backend == "vllm" and p.device == "cpu":
        raise ProfileError(f"{where}: sampling.backend 'vllm' needs a GPU, but device is 'cpu' "
                           "(use device: auto or cuda, or sampling.backend: transformers)")
    if p.sampling.max_model_len and p.sampling.max_model_len <= max(p.sampling.max_new_tokens, p.evaluation.max_new_tokens):
        raise ProfileError(f"{where}: sampling.max_model_len ({p.sampling.max_model_len}) leaves no room for the prompt: "
                           "it must exceed sampling.max_new_tokens and evaluation.max_new_tokens (0 derives it)")


def _validate_ablations(a: AblationsConfig, where: str) -> None:
    """The ablations section's lists: sweep points in range, headline entries non-empty strings."""
    for name, lo, hi in (("alphas", 0.0, 1.0), ("epsilons", 0.0, None), ("etas", 0.0, 1.0)):
        for v in getattr(a, name):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or (hi is not None and v > hi):
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
    """The mapping a profile file holds; ProfileError for invalid YAML, duplicate keys, an empty file or an alias bomb."""
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


def set_threads(n: int) -> int:
    """Set torch's CPU thread count (0 keeps torch's default); return the count in use."""
    import torch

    if n > 0:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # already set once in this process
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_seed(run_seed: int, stage: str) -> int:
    """A per-stage seed derived deterministically from the run seed and the stage name."""
    h = hashlib.sha256(f"{run_seed}:{stage}".encode()).hexdigest()
    return int(h[:8], 16) % (2**31 - 1)


def _env_dir(var: str, default: Path) -> Path:
    """An absolute folder from an environment variable; a relative one is taken relative to the repository root.

    Relative to the repository, not the working directory: notebooks run with the notebooks/ folder as theirs,
    the shell that started them elsewhere (run_all.sh makes the variable absolute before it starts any).
    """
    value = os.environ.get(var, "")
    if not value:
        return default
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def runs_root() -> Path:
    """Root of the run folders (TSQ_RUNS_DIR or runs/ in the repo), as an absolute path."""
    return _env_dir("TSQ_RUNS_DIR", REPO_ROOT / "runs")


def run_dir(profile: Profile) -> Path:
    """The run folder of a profile, runs/<profile>/ (created)."""
    d = runs_root() / profile.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def figures_dir(profile: Profile) -> Path:
    """The figure folder of a profile, figures/<profile>/ (created)."""
    d = _env_dir("TSQ_FIGURES_DIR", REPO_ROOT / "figures") / profile.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def resolve_device(profile: Profile) -> str:
    """The torch device string a profile asks for ('auto' picks CUDA when present)."""
    if profile.device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return profile.device
