"""Profiles: every shipped profile loads; bad keys and values fail naming the key and the file; overrides; seeds."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from tsq_utils.core import config
from tsq_utils.core.config import (
    PretrainConfig,
    Profile,
    ProfileError,
    ToyWorldConfig,
    available_profiles,
    load_profile,
    stage_seed,
)


def write_profile(tmp_path: Path, body: str, name: str = "custom") -> Path:
    """A profile file in a temp folder; returns its path."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    return path


def load_error(path: Path, overrides: dict | None = None) -> str:
    """The ProfileError message that loading the file raises."""
    with pytest.raises(ProfileError) as e:
        load_profile(str(path), overrides)
    return str(e.value)


# ----------------------------------------------------------------------------- shipped profiles


def test_shipped_profiles_present():
    assert {"ci", "toy"} <= set(available_profiles())


@pytest.mark.parametrize("name", available_profiles())
def test_each_shipped_profile_loads(name):
    p = load_profile(name)
    assert isinstance(p, Profile)
    assert p.name == name
    assert Path(p.source_file) == config.PROFILES_DIR / f"{name}.yaml"
    assert p.toyworld.k_min <= p.toyworld.k_max
    assert p.pretrain.hidden_size % p.pretrain.num_heads == 0
    # every key the file sets is a real field, with its value kept (ints widened to floats where declared)
    raw = yaml.safe_load((config.PROFILES_DIR / f"{name}.yaml").read_text())
    for section, values in raw.items():
        if isinstance(values, dict) and section not in ("name",):
            sub = getattr(p, section)
            for key, value in values.items():
                assert getattr(sub, key) == value, f"{name}: {section}.{key}"
        else:
            assert getattr(p, section) == values


def test_toy_profile_is_the_default_world():
    """toy.yaml sets only the model: the world and the pretraining are the dataclass defaults."""
    p = load_profile("toy")
    assert p.model.source == "toy" and p.model.path == "checkpoints/toy-reasoner"
    assert p.toyworld == ToyWorldConfig()
    assert p.pretrain == PretrainConfig()
    assert p.pretrain.retrain is False


def test_to_dict_is_plain_and_drops_source_file():
    d = load_profile("ci").to_dict()
    assert "source_file" not in d
    assert d["toyworld"]["k_max"] == 3 and d["name"] == "ci"
    yaml.safe_dump(d)  # plain data only


def test_load_by_path(tmp_path):
    path = write_profile(tmp_path, "seed: 7\nsampling:\n  n: 3\n")
    p = load_profile(str(path))
    assert (p.name, p.seed, p.sampling.n, p.source_file) == ("custom", 7, 3, str(path))
    assert p.sampling.temperature == 1.0  # untouched keys keep their defaults


def test_empty_profile_file_is_an_error(tmp_path):
    for body in ["", "# only a comment\n", "---\n"]:
        msg = load_error(write_profile(tmp_path, body))
        assert "the profile is empty" in msg and "custom.yaml" in msg
    p = load_profile(str(write_profile(tmp_path, "seed: 5\n")))  # one key: the rest are the defaults
    assert p.seed == 5 and p.selection == config.SelectionConfig()


# ----------------------------------------------------------------------------- errors name the key and the file


@pytest.mark.parametrize("body,key,phrase", [
    ("sampling:\n  nn: 3\n", "sampling.nn", "unknown key"),
    ("bogus: 1\n", ".bogus", "unknown key"),
    ("sampling:\n  n: three\n", "sampling.n", "expected int"),
    ("sampling:\n  n: 2.5\n", "sampling.n", "expected int"),
    ("sampling:\n  n: true\n", "sampling.n", "expected an integer"),
    ("selection:\n  alpha: high\n", "selection.alpha", "expected float"),
    ("selection:\n  alpha: true\n", "selection.alpha", "expected float"),
    ("refinement:\n  enabled: 1\n", "refinement.enabled", "expected bool"),
    ("selection:\n  alpha: 1.5\n", "selection.alpha", "above the maximum 1.0"),
    ("sampling:\n  n: 0\n", "sampling.n", "below the minimum 1"),
    ("toyworld:\n  k_max: 9\n", "toyworld.k_max", "above the maximum 8"),
    ("selection:\n  variant: longest\n", "selection.variant", "not one of"),
    ("device: tpu\n", "device", "not one of"),
    ("training:\n  length_margin_sign: 0\n", "training.length_margin_sign", "not one of"),
    ("selection:\n  alpha: .nan\n", "selection.alpha", "NaN"),
    ("refinement:\n  epsilon: .nan\n", "refinement.epsilon", "NaN"),
    ("sampling: 3\n", "sampling", "expected a mapping"),
])
def test_bad_values_name_key_and_file(tmp_path, body, key, phrase):
    path = write_profile(tmp_path, body)
    msg = load_error(path)
    assert str(path) in msg
    assert key in msg
    assert phrase in msg


def test_unknown_key_lists_the_known_ones(tmp_path):
    msg = load_error(write_profile(tmp_path, "selection:\n  alfa: 0.2\n"))
    assert "alpha" in msg and "q_fix" in msg


def test_int_accepted_for_float_field(tmp_path):
    p = load_profile(str(write_profile(tmp_path, "selection:\n  alpha: 1\n")))
    assert p.selection.alpha == 1.0 and isinstance(p.selection.alpha, float)


def test_choice_accepted(tmp_path):
    p = load_profile(str(write_profile(tmp_path, "selection:\n  variant: q_fix\ntraining:\n  length_margin_sign: 1\n")))
    assert p.selection.variant == "q_fix" and p.training.length_margin_sign == 1


def test_bounds_are_inclusive(tmp_path):
    p = load_profile(str(write_profile(tmp_path, "selection:\n  alpha: 0.0\n  q_fix: 1.0\n")))
    assert (p.selection.alpha, p.selection.q_fix) == (0.0, 1.0)


@pytest.mark.parametrize("weights", [
    "[1, 2, 3]",               # not four
    "[1, 2, 3, 4, 5]",
    "[0.5, -0.1, 0.3, 0.3]",   # negative
    "[0, 0, 0, 0]",            # no positive weight
    "[true, 1, 1, 1]",         # a bool is not a weight
    "[a, 1, 1, 1]",
    ".nan",
    "[.inf, 1, 1, 1]",         # not finite: the draw would divide inf by inf
])
def test_phrasings_must_be_four_weights(tmp_path, weights):
    path = write_profile(tmp_path, f"toyworld:\n  phrasings: {weights}\n")
    msg = load_error(path)
    assert str(path) in msg and "toyworld.phrasings" in msg


def test_phrasings_and_teacher_accepted(tmp_path):
    p = load_profile(str(write_profile(tmp_path, "toyworld:\n  teacher: habit\n  phrasings: [0, 0, 0, 2]\n")))
    assert (p.toyworld.teacher, p.toyworld.phrasings) == ("habit", [0, 0, 0, 2])
    assert ToyWorldConfig().teacher == "local" and ToyWorldConfig().phrasings == [0.15, 0.2, 0.25, 0.4]
    assert ToyWorldConfig().phrasings is not ToyWorldConfig().phrasings  # a fresh list per config
    msg = load_error(write_profile(tmp_path, "toyworld:\n  teacher: global\n"))
    assert "toyworld.teacher" in msg and "not one of" in msg and "'local', 'habit'" in msg


def test_k_min_above_k_max(tmp_path):
    path = write_profile(tmp_path, "toyworld:\n  k_min: 5\n  k_max: 3\n")
    msg = load_error(path)
    assert str(path) in msg and "k_min (5)" in msg and "k_max (3)" in msg


def test_heads_must_divide_hidden(tmp_path):
    msg = load_error(write_profile(tmp_path, "pretrain:\n  hidden_size: 100\n  num_heads: 3\n"))
    assert "hidden_size" in msg and "num_heads" in msg


def test_invalid_yaml(tmp_path):
    path = write_profile(tmp_path, "sampling: [1, 2\n")
    msg = load_error(path)
    assert str(path) in msg and "YAML" in msg


def test_top_level_must_be_mapping(tmp_path):
    assert "mapping" in load_error(write_profile(tmp_path, "- 1\n- 2\n"))


def test_unknown_profile_lists_available():
    with pytest.raises(ProfileError) as e:
        load_profile("no-such-profile")
    msg = str(e.value)
    assert "no-such-profile" in msg
    for name in available_profiles():
        assert name in msg


def test_profile_error_is_a_value_error():
    assert issubclass(ProfileError, ValueError)


# ----------------------------------------------------------------------------- overrides


def test_dotted_overrides():
    p = load_profile("toy", {"selection.alpha": 0.3, "sampling.n": 4, "seed": 9, "data.eval": ["toy", "math500"]})
    assert p.selection.alpha == 0.3
    assert p.sampling.n == 4
    assert p.seed == 9
    assert p.data.eval == ["toy", "math500"]
    # the rest of the file is untouched
    assert p.model.path == "checkpoints/toy-reasoner"
    assert load_profile("toy").selection.alpha == 0.2  # the override did not leak into the file or a cache


def test_overrides_are_validated():
    with pytest.raises(ProfileError, match=r"selection\.alpha.*above the maximum"):
        load_profile("toy", {"selection.alpha": 2.0})
    with pytest.raises(ProfileError, match=r"selection\.alfa: unknown key"):
        load_profile("toy", {"selection.alfa": 0.2})
    with pytest.raises(ProfileError, match=r"k_min \(8\) exceeds"):
        load_profile("ci", {"toyworld.k_min": 8})


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ProfileError, match=r"'seed.x'.*'seed' is not a section"):
        load_profile("toy", {"seed.x": 1})


def test_override_creates_a_missing_section():
    """toy.yaml has no toyworld section (the world is the defaults): an override still lands in it."""
    assert "toyworld" not in yaml.safe_load((config.PROFILES_DIR / "toy.yaml").read_text())
    p = load_profile("toy", {"toyworld.teacher": "habit"})
    assert p.toyworld.teacher == "habit" and p.toyworld.p_slip == ToyWorldConfig().p_slip


# ----------------------------------------------------------------------------- seeds, folders, devices


def test_stage_seed_deterministic_and_distinct():
    assert stage_seed(1234, "sampling") == stage_seed(1234, "sampling")
    stages = ["base_model", "sampling", "selection", "refinement", "training", "evaluation", "ablations", "tldr"]
    seeds = [stage_seed(1234, s) for s in stages]
    assert len(set(seeds)) == len(seeds)
    assert stage_seed(1234, "sampling") != stage_seed(1235, "sampling")
    assert all(0 <= s < 2**31 - 1 for s in seeds)


def test_stage_seed_value_is_stable():
    """The derivation is part of reproducibility: sha256("<seed>:<stage>"), first 8 hex digits, mod 2^31 - 1."""
    import hashlib

    expected = int(hashlib.sha256(b"1234:base_model").hexdigest()[:8], 16) % (2**31 - 1)
    assert stage_seed(1234, "base_model") == expected


def test_seed_everything_repeats():
    import random

    import numpy as np
    import torch

    config.seed_everything(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    config.seed_everything(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_run_and_figure_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("TSQ_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("TSQ_FIGURES_DIR", str(tmp_path / "figs"))
    p = load_profile("ci")
    assert config.run_dir(p) == tmp_path / "runs" / "ci" and (tmp_path / "runs" / "ci").is_dir()
    assert config.figures_dir(p) == tmp_path / "figs" / "ci" and (tmp_path / "figs" / "ci").is_dir()


def test_resolve_device():
    import torch

    assert config.resolve_device(load_profile("toy")) == "cpu"
    auto = load_profile("toy", {"device": "auto"})
    assert config.resolve_device(auto) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_set_threads_zero_keeps_current():
    import torch

    before = torch.get_num_threads()
    assert config.set_threads(0) == before
    assert config.set_threads(1) == 1


def section_classes() -> list[type]:
    """Every config section dataclass of a Profile (found from its fields, so new sections are covered)."""
    import typing

    hints = typing.get_type_hints(Profile)
    return [hints[f.name] for f in dataclasses.fields(Profile) if dataclasses.is_dataclass(hints[f.name])]


def test_dataclass_defaults_satisfy_their_own_ranges():
    """A default outside its declared range would make an empty profile invalid."""
    classes = section_classes()
    assert {ToyWorldConfig, PretrainConfig, config.SamplingConfig, config.SelectionConfig} <= set(classes)
    for cls in classes:
        obj = cls()
        for f in dataclasses.fields(cls):
            meta = f.metadata or {}
            v = getattr(obj, f.name)
            if meta.get("lo") is not None:
                assert v >= meta["lo"], f"{cls.__name__}.{f.name}"
            if meta.get("hi") is not None:
                assert v <= meta["hi"], f"{cls.__name__}.{f.name}"
            if meta.get("choices") is not None:
                assert v in meta["choices"], f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize("body,keys", [
    ("sampling:\n  backend: vllm\n", ["sampling.backend", "device"]),
    ("sampling:\n  max_new_tokens: 512\n  max_model_len: 512\n", ["sampling.max_model_len", "max_new_tokens"]),
])
def test_cross_checks_name_keys_and_file(tmp_path, body, keys):
    path = write_profile(tmp_path, body)
    msg = load_error(path)
    assert str(path) in msg and all(k in msg for k in keys)


def test_vllm_allowed_with_a_gpu_device(tmp_path):
    p = load_profile(str(write_profile(tmp_path, "device: auto\nsampling:\n  backend: vllm\n")))
    assert p.sampling.backend == "vllm"


# ----------------------------------------------------------------------------- the profile reference


def test_every_profile_field_is_documented_once_in_its_dataclass():
    """Each key carries its help text (what it does and why) and each section a docstring: docs/profiles.md
    is rendered from these, so a new field without them fails here."""
    fields = config.profile_fields()
    assert len(fields) > 90 and len({k for k, *_ in fields}) == len(fields)
    for dotted, f, _, section_doc in fields:
        text = f.metadata.get("help", "")
        assert len(text.split()) >= 3 and text.rstrip().endswith((".", ")")), f"{dotted}: help text {text!r}"
        assert section_doc.strip(), f"{dotted}: its section dataclass has no docstring"
    assert "source_file" not in {k for k, *_ in fields}  # set by load_profile, not a profile key


def test_profile_reference_rows_name_range_default_and_reading_notebooks():
    """Known rows: a choice field, an open range, a list default, a key only 02 and 06 read, and prose read by none."""
    ref = config.profile_reference()
    rows = {line.split("|")[1].strip(" `"): line for line in ref.splitlines() if line.startswith("| `")}
    assert len(rows) == len(config.profile_fields())
    assert rows["selection.alpha"].endswith("| 02 06 |") and "| `0.2` | [0, 1] |" in rows["selection.alpha"]
    assert '| "transformers", "vllm" |' in rows["sampling.backend"]
    assert "| (0, 100] |" in rows["training.beta"]
    assert '`["toy"]`' in rows["data.eval"]
    assert rows["description"].endswith("| none |")
    assert rows["tldr.floor_gaps"].count("\\|") == 4  # the help's |T_L - T_S| is escaped, not a column break
    assert rows["pretrain.n_tokens"].endswith("| 00 |")


def test_docs_profiles_md_is_in_sync_with_the_dataclasses():
    """docs/profiles.md is generated; an edit to a field's help, default or range must be followed by a rerun."""
    assert config.PROFILES_DOC.read_text(encoding="utf-8") == config.profile_reference(), (
        "docs/profiles.md is out of date: run `python -m tsq_utils.core.config --doc > docs/profiles.md`")


def test_profile_reference_command_prints_the_page():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tsq_utils.core.config", "--doc"], capture_output=True, text=True,
                         cwd=config.REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == config.profile_reference() and "RuntimeWarning" not in out.stderr


def test_profile_choices_agree_with_the_modules_that_implement_them():
    """core cannot import the layers that own these names, so the choices are written twice; here they must agree
    (a new refinement mode, model source or accelerate config is added in both places, or fails here)."""
    from tsq_utils.core.pointer import POINTER_KINDS
    from tsq_utils.method import dpo_l, refinement, selection
    from tsq_utils.model import base_model

    choices = {k: f.metadata.get("choices") for k, f, *_ in config.profile_fields()}
    assert choices["selection.variant"] == selection.VARIANTS
    assert choices["refinement.kl_reduction"] == refinement.REDUCTIONS
    assert choices["refinement.scoring"] == refinement.SCORING_MODES
    assert choices["refinement.candidates"] == refinement.CANDIDATE_SOURCES
    assert choices["refinement.steps"] == refinement.STEP_MODES
    assert choices["training.accelerate_config"] == dpo_l.ACCELERATE_CONFIGS
    assert choices["model.dtype"] == base_model.DTYPES
    assert choices["model.source"] == tuple(base_model.MODEL_SOURCES) == tuple(POINTER_KINDS)
