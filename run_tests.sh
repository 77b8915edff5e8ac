#!/usr/bin/env bash
# The test command: unit tests (tests/) and every notebook under nbval on the ci profile, in one pytest run.
#   ./run_tests.sh [extra pytest arguments, e.g. -x or -k stage]
# Sets up .venv first exactly like run_all.sh (scripts/setup_venv.sh; TSQ_SKIP_SETUP=1 skips it).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO"
# shellcheck source=scripts/setup_venv.sh
source "$REPO/scripts/setup_venv.sh"
tsq_setup_venv "$REPO" || exit 1

targets=(tests)
shopt -s nullglob
nbs=(notebooks/*.ipynb)
shopt -u nullglob
if ((${#nbs[@]})); then
    targets+=(notebooks)
else
    echo "run_tests.sh: notebooks/ holds no notebooks: running the unit tests only" >&2
fi

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
exit "$rc"
