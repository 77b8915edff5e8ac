"""environment.yml agrees with pyproject.toml, and the fragile libraries are pinned narrowly."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ENV = yaml.safe_load((REPO / "environment.yml").read_text())


def key(req: str) -> tuple:
    """A requirement as comparable data: (canonical name, extras, specifier set, marker)."""
    r = Requirement(req)
    return canonicalize_name(r.name), frozenset(r.extras), r.specifier, str(r.marker or "")


def pip_section() -> list[str]:
    pips = [d["pip"] for d in ENV["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml needs exactly one pip section"
    return pips[0]


def pyproject_spec(name: str) -> SpecifierSet:
    for req in PYPROJECT["project"]["dependencies"]:
        r = Requirement(req)
        if canonicalize_name(r.name) == name:
            return r.specifier
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def test_environment_yml_is_a_thin_conda_file():
    assert ENV["name"] == "tokensqueeze-companion"
    conda = [d for d in ENV["dependencies"] if isinstance(d, str)]
    assert conda == ["python=3.11", "pip"]
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains("3.11")


def test_environment_pip_section_matches_pyproject():
    pip = pip_section()
    assert "-e ." in pip
    reqs = [r for r in pip if not r.startswith("-")]
    assert len(reqs) == len({key(r)[0] for r in reqs}), "a package is listed twice"
    project = PYPROJECT["project"]
    expected = {key(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    got = {key(r) for r in reqs}
    assert got == expected, f"only in environment.yml: {got - expected}; only in pyproject: {expected - got}"


def upper_bound(spec: SpecifierSet) -> Version:
    uppers = [Version(s.version) for s in spec if s.operator == "<"]
    assert len(uppers) == 1, f"{spec}: needs one '<' upper bound"
    return uppers[0]


def lower_bound(spec: SpecifierSet) -> Version:
    lowers = [Version(s.version) for s in spec if s.operator == ">="]
    assert len(lowers) == 1, f"{spec}: needs one '>=' lower bound"
    return lowers[0]


@pytest.mark.parametrize("name, max_minors", [("torch", 2), ("transformers", 1), ("trl", 1)])
def test_fragile_libraries_are_pinned_narrowly(name, max_minors):
    spec = pyproject_spec(name)
    lo, hi = lower_bound(spec), upper_bound(spec)
    # at most `max_minors` minor series: transformers/trl stay inside one minor version
    assert hi.major == lo.major and lo.minor < hi.minor <= lo.minor + max_minors and hi.micro == 0, spec


@pytest.mark.parametrize("name", ["torch", "transformers", "trl"])
def test_installed_versions_satisfy_the_pins(name):
    assert pyproject_spec(name).contains(metadata.version(name).split("+")[0])


def test_scripts_install_a_torch_inside_the_pin():
    setup = (REPO / "scripts" / "setup_venv.sh").read_text()
    pin = re.search(r'^TSQ_TORCH_SPEC="torch==([0-9.]+)"', setup, re.M)
    assert pin, "scripts/setup_venv.sh must set TSQ_TORCH_SPEC"
    assert pyproject_spec("torch").contains(pin.group(1))
    assert f"torch=={pin.group(1)} -e .[dev]" in (REPO / "run_all.sh").read_text()
