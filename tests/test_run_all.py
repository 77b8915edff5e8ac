"""run_all.sh, run_tests.sh, .ci/run and scripts/setup_venv.sh, run without installing anything."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["run_all.sh", "run_tests.sh", ".ci/run", "scripts/setup_venv.sh"]


def run(args: list[str], env_extra: dict | None = None, cwd: Path = REPO,
        timeout: int = 120) -> subprocess.CompletedProcess:
    """Run a command with TSQ_SKIP_SETUP=1 and this interpreter (never creates or installs a venv)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSQ_")}
    env.update({"TSQ_SKIP_SETUP": "1", "TSQ_PYTHON": sys.executable})
    env.update(env_extra or {})
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_all(*args: str, **kw) -> subprocess.CompletedProcess:
    return run(["bash", str(REPO / "run_all.sh"), *args], **kw)


def write_notebook(path: Path, *cells: str, params: str | None = None) -> None:
    """A notebook with an optional tagged parameters cell followed by code cells."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {path.stem}"))
    if params is not None:
        cell = nbformat.v4.new_code_cell(params)
        cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def nbdir(tmp_path):
    d = tmp_path / "nb"
    d.mkdir()
    for name in ["00_a", "01_b", "03_c"]:
        write_notebook(d / f"{name}.ipynb", "print('hi')", params="profile = 'toy'")
    return d


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
    path = REPO / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    if script != "scripts/setup_venv.sh":  # sourced, not run
        assert os.access(path, os.X_OK), f"{script} is not executable"


def test_help():
    r = run_all("--help")
    assert r.returncode == 0
    for text in ["usage: ./run_all.sh", "--profile NAME", "--only", "-p KEY VALUE", "TSQ_SKIP_SETUP", "torch==2.13.0"]:
        assert text in r.stdout, text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unknown option: --bogus"),
        (["extra"], "unknown option: extra"),
        (["--profile"], "--profile needs a NAME"),
        (["-p", "alpha"], "-p needs a KEY and a VALUE"),
        (["-p", "selection.alpha", "0.3"], "must be a Python name"),
        (["-p", "profile", "ci"], "use --profile NAME"),
        (["--only", "1,x"], "'x' is not a notebook number"),
        (["--only", "02"], "no notebook 02_*.ipynb"),
    ],
)
def test_usage_errors_exit_2(nbdir, args, message):
    r = run_all(*args, env_extra={"TSQ_NOTEBOOKS_DIR": str(nbdir)})
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "usage: ./run_all.sh" in r.stderr


def test_unknown_profile_fails_before_anything_runs(tmp_path, nbdir):
    runs = tmp_path / "runs"
    r = run_all("--profile", "nope", env_extra={"TSQ_NOTEBOOKS_DIR": str(nbdir), "TSQ_RUNS_DIR": str(runs)})
    assert r.returncode != 0
    available = ", ".join(sorted(f.stem for f in (REPO / "profiles").glob("*.yaml")))  # ci, r1-1.5b, r1-7b, toy
    assert f"unknown profile 'nope': no file profiles/nope.yaml (available: {available})" in r.stderr
    assert not runs.exists() and r.stdout == ""


def test_dry_run_orders_and_passes_parameters(tmp_path, nbdir):
    runs = tmp_path / "runs"
    write_notebook(nbdir / "03_c.ipynb", "print('hi')", params="profile = 'toy'\nalpha = 0.2")
    r = run_all("-n", "--profile", "ci", "--only", "3,00", "-p", "alpha", "0.3",
                env_extra={"TSQ_NOTEBOOKS_DIR": str(nbdir), "TSQ_RUNS_DIR": str(runs)})
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("would run")]
    assert [line.split()[3].rsplit("/", 1)[1] for line in lines] == ["00_a.ipynb", "03_c.ipynb"]
    assert all(f"{runs}/ci/notebooks/" in line for line in lines)
    # a parameter goes only to the notebooks whose parameters cell defines it
    assert lines[0].endswith("-p profile ci") and lines[1].endswith("-p profile ci -p alpha 0.3")
    assert f"--cwd {nbdir}" in lines[0]
    assert not runs.exists()


def test_empty_notebook_folder_is_an_error(tmp_path):
    r = run_all(env_extra={"TSQ_NOTEBOOKS_DIR": str(tmp_path)})
    assert r.returncode == 1 and "nothing to run" in r.stderr


def test_skip_setup_with_a_broken_python(nbdir):
    r = run_all(env_extra={"TSQ_NOTEBOOKS_DIR": str(nbdir), "TSQ_PYTHON": "/nonexistent/python"})
    assert r.returncode == 1 and "TSQ_SKIP_SETUP=1 but the interpreter '/nonexistent/python' does not run" in r.stderr


def test_failing_notebook_is_reported_and_stops_the_run(tmp_path):
    """One real kernel start: the parameters arrive, then a cell raises (the success path costs another)."""
    nbdir, runs = tmp_path / "nb", tmp_path / "runs"
    nbdir.mkdir()
    write_notebook(
        nbdir / "00_fails.ipynb",
        "import os\nprint('GOT', profile, os.environ['TSQ_PROFILE'], foo, type(foo).__name__, os.getcwd())",
        "# the failing cell\nraise ValueError(f'boom {foo}')",
        "print('never')",
        params="profile = 'toy'\nfoo = 1",
    )
    write_notebook(nbdir / "01_never.ipynb", "print('never')")
    r = run_all("--profile", "ci", "-p", "foo", "42",
                env_extra={"TSQ_NOTEBOOKS_DIR": str(nbdir), "TSQ_RUNS_DIR": str(runs), "TSQ_KERNEL": "python3"})
    assert r.returncode == 1
    out_dir = runs / "ci" / "notebooks"
    executed = out_dir / "00_fails.failed.ipynb"  # a failed run never takes the name of the last good one
    assert "FAILED: 00_fails.ipynb (profile ci)" in r.stderr
    # the source notebook's 4th cell (markdown, parameters, print, raise) is the one that failed
    assert "failing cell: cell 4 (In [" in r.stderr and "ValueError: boom 42" in r.stderr
    assert "cell starts: # the failing cell" in r.stderr
    assert f"executed notebook: {executed}" in r.stderr
    assert (out_dir / "00_fails.failed.log").is_file() and not (out_dir / "00_fails.ipynb").exists()
    assert not (out_dir / "01_never.ipynb").exists() and "01_never" not in r.stdout
    nb = nbformat.read(executed, as_version=4)  # joins multi-line strings
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert f"GOT ci ci 42 int {nbdir}" in printed and "never" not in printed


# --- scripts/setup_venv.sh, with a fake venv Python that records what it is asked to do --------------

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
case "$1 $2" in
    "-m pip") exit "${FAKE_PIP_RC:-0}" ;;
    "-m ipykernel") k="$FAKE_VENV/share/jupyter/kernels/tsq"; mkdir -p "$k" && echo '{}' > "$k/kernel.json"; exit 0 ;;
esac
PYTHONPATH="$FAKE_REPO" exec "$REAL_PYTHON" "$@"
"""


@pytest.fixture
def fake_repo(tmp_path):
    """A checkout with pyproject.toml, tsq_utils/ and a .venv whose python fakes pip and ipykernel."""
    repo = tmp_path / "repo"
    (repo / "tsq_utils").mkdir(parents=True)
    (repo / "tsq_utils" / "__init__.py").write_text("")
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    py = repo / ".venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    return repo


def setup(repo: Path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Source setup_venv.sh and run tsq_setup_venv on `repo`; return the result and the fake's new log lines."""
    log = repo / "calls.log"
    before = log.read_text().splitlines() if log.exists() else []
    script = 'source "$1/scripts/setup_venv.sh" && tsq_setup_venv "$2" && echo "TSQ_PY=$TSQ_PY"'
    env = {"FAKE_LOG": str(log), "FAKE_VENV": str(repo / ".venv"), "FAKE_REPO": str(repo),
           "REAL_PYTHON": sys.executable, "TSQ_SKIP_SETUP": "0", **env}
    r = run(["bash", "-c", script, "_", str(REPO), str(repo)], env_extra=env)
    after = log.read_text().splitlines() if log.exists() else []
    return r, after[len(before):]


def pip_calls(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("-m pip")]


def test_setup_installs_once_then_only_when_needed(fake_repo):
    r, calls = setup(fake_repo)
    assert r.returncode == 0, r.stderr
    assert f"TSQ_PY={fake_repo}/.venv/bin/python" in r.stdout
    # The test's interpreter already holds a torch inside the pin, so it is kept (no torch==2.13.0 here; the
    # no-torch and CUDA-torch cases are in test_packaging.py); then the data-only Qwen ranks, without deps.
    assert pip_calls(calls) == ["-m pip install -e .[dev]", "-m pip install --quiet --no-deps dashscope==2.0.2"]
    assert any(c.startswith("-m ipykernel install --sys-prefix --name tsq") for c in calls)
    stamp = (fake_repo / ".venv" / ".tsq-install-stamp").read_text().strip()
    expected = hashlib.sha256((fake_repo / "pyproject.toml").read_bytes() + b"\ntorch==2.13.0").hexdigest()
    assert stamp == expected

    r, calls = setup(fake_repo)  # nothing changed: no pip, no kernel install
    assert r.returncode == 0 and pip_calls(calls) == [] and not any("ipykernel" in c for c in calls)

    with (fake_repo / "pyproject.toml").open("a") as f:
        f.write("# changed\n")
    _, calls = setup(fake_repo)
    assert len(pip_calls(calls)) == 2

    shutil.rmtree(fake_repo / "tsq_utils")  # package no longer importable from this checkout
    _, calls = setup(fake_repo)
    assert len(pip_calls(calls)) == 2


def test_setup_reports_pip_failure_and_broken_venv(fake_repo):
    r, calls = setup(fake_repo, FAKE_PIP_RC="1")
    assert r.returncode != 0 and "pip install failed" in r.stderr
    assert not (fake_repo / ".venv" / ".tsq-install-stamp").exists()
    (fake_repo / ".venv" / "bin" / "python").unlink()
    r, _ = setup(fake_repo)
    assert r.returncode != 0 and "has no bin/python; remove it" in r.stderr


# --- run_tests.sh and .ci/run, with a fake Python that records the pytest call ----------------------

@pytest.mark.parametrize("entry", ["run_tests.sh", ".ci/run"])
@pytest.mark.parametrize("pytest_rc, expected_rc", [(0, 0), (1, 1), (5, 1)])
def test_run_tests_calls_pytest_once_and_fails_when_nothing_ran(tmp_path, entry, pytest_rc, expected_rc):
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(
        f'#!/usr/bin/env bash\necho "TSQ_PROFILE=$TSQ_PROFILE $*" >> {log}\n'
        f'[[ "$2" == pytest ]] && exit {pytest_rc}\nexit 0\n'
    )
    fake.chmod(0o755)
    r = run([str(REPO / entry), "-x"], env_extra={"TSQ_PYTHON": str(fake)}, cwd=tmp_path)
    assert r.returncode == expected_rc, r.stderr
    calls = log.read_text().splitlines()
    pytest_calls = [c for c in calls if " -m pytest " in c]
    assert len(pytest_calls) == 1
    call = pytest_calls[0].split()
    assert call[0] == "TSQ_PROFILE=ci" and call[3] == "tests"
    assert "--nbval-lax" in call and call[call.index("--nbval-kernel-name") + 1] == "tsq"
    assert call[-1] == "-x"
    has_notebooks = any((REPO / "notebooks").glob("*.ipynb"))
    assert ("notebooks" in call) == has_notebooks
    if pytest_rc == 5:
        assert "collected no tests" in r.stderr


@pytest.mark.parametrize("entry", ["run_tests.sh", ".ci/run"])
def test_run_tests_lints_first_and_stops_on_a_finding(tmp_path, entry):
    """ruff check . runs before pytest; a finding (ruff exit 1) fails the run at once with a message, no pytest."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {log}\n'
        f'[[ "$2 $3" == "ruff check" ]] && exit "${{FAKE_RUFF_RC:-0}}"\nexit 0\n'
    )
    fake.chmod(0o755)
    r = run([str(REPO / entry)], env_extra={"TSQ_PYTHON": str(fake), "TSQ_LANE": "0"}, cwd=tmp_path)
    calls = log.read_text().splitlines()
    assert r.returncode == 0, r.stderr
    ruff_at = calls.index("-m ruff check .")
    assert ruff_at < next(i for i, c in enumerate(calls) if c.startswith("-m pytest "))
    log.unlink()
    env = {"TSQ_PYTHON": str(fake), "TSQ_LANE": "0", "FAKE_RUFF_RC": "1"}
    r = run([str(REPO / entry)], env_extra=env, cwd=tmp_path)
    assert r.returncode == 1 and "ruff check . found the problems above" in r.stderr
    assert not any(c.startswith("-m pytest") for c in log.read_text().splitlines())


def test_run_tests_names_a_missing_ruff(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\n[[ "$2" == ruff ]] && exit 1\nexit 0\n')
    fake.chmod(0o755)
    r = run([str(REPO / "run_tests.sh")], env_extra={"TSQ_PYTHON": str(fake), "TSQ_LANE": "0"}, cwd=tmp_path)
    assert r.returncode == 1 and "ruff is not installed" in r.stderr and "dev extra" in r.stderr


def test_rerun_on_code_change_is_an_option(nbdir):
    r = run_all("--help")
    assert "--rerun-on-code-change" in r.stdout and "kept: code changed since" in r.stdout
    r = run_all("-n", "--rerun-on-code-change", env_extra={"TSQ_NOTEBOOKS_DIR": str(nbdir)})
    assert r.returncode == 0, r.stderr
    assert "TSQ_RERUN_ON_CODE_CHANGE=1" in (REPO / "run_all.sh").read_text()
