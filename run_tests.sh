#!/usr/bin/env bash
# The test command: ruff first, then the unit tests (tests/) and every notebook under nbval on the ci profile, in one
# pytest run.
#   ./run_tests.sh [extra pytest arguments, e.g. -x or -k stage]
# Sets up .venv first exactly like run_all.sh (scripts/setup_venv.sh; TSQ_SKIP_SETUP=1 skips it). Then runs the unit
# tests a second time under the oldest transformers the pins allow (TSQ_LANE=0 skips that, TSQ_LANE=1 forces it).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO"
# shellcheck source=scripts/setup_venv.sh
source "$REPO/scripts/setup_venv.sh"
tsq_setup_venv "$REPO" || exit 1

# Lint first (seconds): ruff over the package, tests, scripts and the notebooks' code cells ([tool.ruff] in
# pyproject.toml). A finding stops here, before the minutes of tests, so that CI fails on it fast.
if ! "$TSQ_PY" -m ruff --version >/dev/null 2>&1; then
    echo "run_tests.sh: ruff is not installed for $TSQ_PY; it is in the dev extra (pip install -e '.[dev]')" >&2
    exit 1
fi
if ! "$TSQ_PY" -m ruff check .; then
    echo "run_tests.sh: ruff check . found the problems above; fix them (ruff check --fix for the safe ones) and rerun" >&2
    exit 1
fi

targets=(tests)
shopt -s nullglob
nbs=(notebooks/*.ipynb)
shopt -u nullglob
if ((${#nbs[@]})); then
    targets+=(notebooks)
else
    echo "run_tests.sh: notebooks/ holds no notebooks: running the unit tests only" >&2
fi

# Second lane (TSQ_LANE=0 skips it; off by default with TSQ_SKIP_SETUP=1, which creates no venv): the unit tests once more under the oldest transformers pyproject allows, the
# GPU stack's side of the pin (vLLM needs an older transformers than the CPU install has; tsq_utils.model.compat bridges
# them). Its venv, .venv/lane-transformers-<version>, sees the main venv's packages (a .pth line) and holds only
# that transformers (and what it needs in other versions) of its own: about a minute to set up, no second torch. Notebook runs are left to the main lane.
lane_setup() {
    local want lane site
    want="$("$TSQ_PY" - <<'PY'
import tomllib
from packaging.requirements import Requirement
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(Requirement(d).specifier for d in deps if Requirement(d).name == "transformers")
print(next(s.version for s in spec if s.operator == ">="))
PY
)" || return 1
    lane="${TSQ_LANE_DIR:-$REPO/.venv/lane-transformers-$want}"
    LANE_PY="$lane/bin/python"
    LANE_TRANSFORMERS="$want"
    if [[ ! -f "$lane/.ready" ]]; then
        rm -rf "$lane"
        "$TSQ_PY" -m venv --without-pip "$lane" || return 1
        site="$("$LANE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        "$TSQ_PY" -c 'import sysconfig; print("import site; site.addsitedir(" + repr(sysconfig.get_paths()["purelib"]) + ")")' \
            >"$site/tsq_main_venv.pth" || return 1
        # with its dependencies: pip installs into the lane only those the main venv lacks or holds in a version this
        # transformers refuses (e.g. huggingface-hub), and never touches the main venv's own (outside the lane's prefix)
        "$TSQ_PY" -m pip --python "$LANE_PY" install --quiet "transformers==$want" || return 1
        touch "$lane/.ready"
    fi
    [[ "$("$LANE_PY" -c 'import transformers; print(transformers.__version__)')" == "$want" ]]
}

# nbval runs each notebook as stored (cwd notebooks/, kernel tsq = the venv's Python); the notebooks
# read their profile from TSQ_PROFILE. --nbval-lax checks that every cell runs, and compares outputs
# only in cells marked # NBVAL_CHECK_OUTPUT.
export TSQ_PROFILE=ci
set +e
"$TSQ_PY" -m pytest "${targets[@]}" --nbval-lax --nbval-kernel-name "${TSQ_KERNEL:-tsq}" -p no:cacheprovider "$@"
rc=$?
set -e
if ((rc == 5)); then
    echo "run_tests.sh: pytest collected no tests; that is a failure, not a pass" >&2
    exit 1
fi
lane_default=1
[[ "${TSQ_SKIP_SETUP:-0}" == "1" ]] && lane_default=0
if [[ "${TSQ_LANE:-$lane_default}" != "0" ]]; then
    echo "run_tests.sh: second lane: the unit tests under the oldest transformers the pins allow"
    if ! lane_setup; then
        echo "run_tests.sh: could not set up the second lane's venv (transformers ${LANE_TRANSFORMERS:-?})" >&2
        exit 1
    fi
    set +e
    # JUPYTER_PATH: the main venv's Jupyter data (nbconvert templates, the kernel spec) that the lane's prefix lacks
    JUPYTER_PATH="$("$TSQ_PY" -c 'import sys; print(sys.prefix)')/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}" \
        TSQ_PYTHON="$LANE_PY" "$LANE_PY" -m pytest tests -p no:cacheprovider -k "not notebook and not run_all" "$@"
    lane_rc=$?
    set -e
    echo "run_tests.sh: lanes: main (transformers $("$TSQ_PY" -c 'import transformers; print(transformers.__version__)')) exit $rc, second (transformers $LANE_TRANSFORMERS) exit $lane_rc"
    if ((lane_rc != 0)); then
        ((rc != 0)) || rc=$lane_rc
        ((rc != 5)) || rc=1
    fi
fi
exit "$rc"
