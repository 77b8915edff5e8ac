#!/usr/bin/env bash
# Run the whole pipeline: every notebooks/NN_*.ipynb in order, with papermill, on one profile.
# Sets itself up on a fresh machine (Python >= 3.10; 3.11 is the tested one): see usage below.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ME="run_all.sh"

usage() {
    cat <<'EOF'
usage: ./run_all.sh [--profile NAME] [--only NN,NN,...] [-p KEY VALUE ...] [--dry-run]

Runs every notebooks/NN_*.ipynb in order with papermill on one profile, and writes the executed
notebooks to runs/<profile>/notebooks/ (with a .log of papermill's output beside each).

  --profile NAME   the profile, profiles/NAME.yaml (default: toy); also exported as TSQ_PROFILE
  --only LIST      run only these notebooks, by number: --only 00,01 (still in pipeline order)
  -p KEY VALUE     pass a parameter to every notebook's parameters cell (repeatable), as papermill
                   does: -p alpha 0.3 -p epsilon 0.01 ("profile" is set by --profile)
  --dry-run, -n    print what would run, set up and run nothing
  -h, --help       this text

First it makes sure .venv exists and holds the package: it creates .venv (python3 -m venv) when
missing and runs `pip install torch==2.13.0 -e .[dev]` when the package is not importable or
pyproject.toml changed since the last install, then installs a Jupyter kernel "tsq" (the venv's
Python) that the notebooks run on.

Environment:
  TSQ_SKIP_SETUP=1    skip the venv set-up and use TSQ_PYTHON (default .venv/bin/python) as it is
  TSQ_PYTHON          the interpreter to use with TSQ_SKIP_SETUP=1
  TSQ_KERNEL          the Jupyter kernel to run the notebooks on (default: tsq)
  TSQ_NOTEBOOKS_DIR   where the notebooks are (default: notebooks/)
  TSQ_RUNS_DIR        root of the run folders (default: runs/)

A failing notebook stops the run: the message names the notebook, the failing cell and its
exception, and the executed notebook to open.
EOF
}

die_usage() {
    echo "$ME: $*" >&2
    usage | head -n 1 >&2
    echo "(./run_all.sh --help for details)" >&2
    exit 2
}

profile="toy"
only=""
dry_run=0
params=()
while (($#)); do
    case "$1" in
        --profile)
            (($# >= 2)) || die_usage "--profile needs a NAME"
            profile="$2"
            shift 2
            ;;
        --profile=*)
            profile="${1#*=}"
            shift
            ;;
        --only)
            (($# >= 2)) || die_usage "--only needs a list of notebook numbers, e.g. 00,01"
            only="$2"
            shift 2
            ;;
        --only=*)
            only="${1#*=}"
            shift
            ;;
        -p | --parameters)
            (($# >= 3)) || die_usage "$1 needs a KEY and a VALUE"
            [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die_usage "-p $2: the key must be a Python name (a variable of the parameters cell)"
            [[ "$2" != "profile" ]] || die_usage "-p profile: use --profile NAME"
            params+=(-p "$2" "$3")
            shift 3
            ;;
        -n | --dry-run)
            dry_run=1
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            die_usage "unknown option: $1"
            ;;
    esac
done

# --- checks that need nothing installed: profile and notebooks ---------------------------------
if [[ ! "$profile" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
    echo "$ME: bad profile name '$profile' (letters, digits, '.', '_', '-')" >&2
    exit 2
fi
if [[ ! -f "$REPO/profiles/$profile.yaml" ]]; then
    available="$(cd "$REPO/profiles" && ls -- *.yaml 2>/dev/null | sed 's/\.yaml$//' | paste -sd, - | sed 's/,/, /g')"
    echo "$ME: unknown profile '$profile': no file profiles/$profile.yaml (available: ${available:-none})" >&2
    exit 2
fi

NB_DIR="${TSQ_NOTEBOOKS_DIR:-$REPO/notebooks}"
NB_DIR="$(cd "$NB_DIR" 2>/dev/null && pwd)" || {
    echo "$ME: notebook folder ${TSQ_NOTEBOOKS_DIR:-$REPO/notebooks} does not exist" >&2
    exit 2
}
shopt -s nullglob
all_nbs=("$NB_DIR"/[0-9][0-9]_*.ipynb)
shopt -u nullglob
if ((${#all_nbs[@]} == 0)); then
    echo "$ME: no notebooks (NN_*.ipynb) in $NB_DIR: nothing to run" >&2
    exit 1
fi

notebooks=()
if [[ -n "$only" ]]; then
    wanted=" "
    IFS=',' read -r -a nums <<<"$only"
    for n in "${nums[@]}"; do
        n="${n//[[:space:]]/}"
        [[ "$n" =~ ^[0-9]{1,2}$ ]] || die_usage "--only $only: '$n' is not a notebook number (00..99)"
        n="$(printf '%02d' "$((10#$n))")"
        found=0
        for nb in "${all_nbs[@]}"; do [[ "$(basename "$nb")" == "${n}_"* ]] && found=1; done
        if ((found == 0)); then
            have="$(for nb in "${all_nbs[@]}"; do basename "$nb" | cut -c1-2; done | paste -sd, -)"
            die_usage "--only: no notebook ${n}_*.ipynb in $NB_DIR (have: $have)"
        fi
        wanted+="$n "
    done
    for nb in "${all_nbs[@]}"; do
        [[ "$wanted" == *" $(basename "$nb" | cut -c1-2) "* ]] && notebooks+=("$nb")
    done
else
    notebooks=("${all_nbs[@]}")
fi

RUNS_ROOT="${TSQ_RUNS_DIR:-$REPO/runs}"
OUT_DIR="$RUNS_ROOT/$profile/notebooks"
KERNEL="${TSQ_KERNEL:-tsq}"

if ((dry_run)); then
    echo "profile $profile, kernel $KERNEL, executed notebooks to $OUT_DIR"
    for nb in "${notebooks[@]}"; do
        echo "would run: papermill $nb $OUT_DIR/$(basename "$nb") -k $KERNEL -l python --cwd $NB_DIR -p profile $profile ${params[*]:-}"
    done
    exit 0
fi

# --- set-up -----------------------------------------------------------------------------------
# shellcheck source=scripts/setup_venv.sh
source "$REPO/scripts/setup_venv.sh"
tsq_setup_venv "$REPO" || exit 1

# Validate the profile with the real loader now, before any notebook runs.
"$TSQ_PY" -c 'import sys; from tsq_utils.config import load_profile; load_profile(sys.argv[1])' \
    "$REPO/profiles/$profile.yaml" || {
    echo "$ME: profile '$profile' is not valid (see above)" >&2
    exit 1
}

export TSQ_PROFILE="$profile"
mkdir -p "$OUT_DIR"

# Print "cell N (In [k]): Ename: evalue" for the first failing cell of an executed notebook.
describe_failure() {
    "$TSQ_PY" - "$1" <<'PY' 2>/dev/null || true
import json, sys
SKIP = {"injected-parameters", "papermill-error-cell-tag"}  # cells papermill adds
try:
    nb = json.load(open(sys.argv[1], encoding="utf-8"))
except (OSError, ValueError):
    sys.exit(0)
n = 0
for cell in nb.get("cells", []):
    if SKIP & set(cell.get("metadata", {}).get("tags", [])):
        continue
    n += 1  # the cell's position in the source notebook
    if cell.get("cell_type") != "code":
        continue
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    pm = cell.get("metadata", {}).get("papermill", {})
    if errors or pm.get("exception") or pm.get("status") == "failed":
        where = f"cell {n} (In [{cell.get('execution_count') or ' '}])"
        if errors:
            e = errors[0]
            msg = f"{e.get('ename')}: {e.get('evalue')}"
        else:
            msg = "the cell did not finish (the kernel may have died)"
        first = next((line for line in "".join(cell.get("source", "")).splitlines() if line.strip()), "")
        print(f"{where}: {msg}\n  cell starts: {first[:100]}")
        break
PY
}

rel() { local p="$1"; echo "${p#"$REPO"/}"; }

now() { date +%s.%N 2>/dev/null || date +%s; }
declare -a timings=()
total_start="$(now)"
i=0
echo "running ${#notebooks[@]} notebook(s) on profile $profile (kernel $KERNEL); executed notebooks in $(rel "$OUT_DIR")"
for nb in "${notebooks[@]}"; do
    i=$((i + 1))
    name="$(basename "$nb")"
    out="$OUT_DIR/$name"
    log="$OUT_DIR/${name%.ipynb}.log"
    echo "==> [$i/${#notebooks[@]}] $name"
    start="$(now)"
    set +e
    "$TSQ_PY" -m papermill "$nb" "$out" -k "$KERNEL" -l python --cwd "$NB_DIR" -p profile "$profile" ${params[@]+"${params[@]}"} 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    secs="$(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
    if ((rc != 0)); then
        cell="$(describe_failure "$out")"
        if [[ -z "$cell" ]]; then
            # No executed notebook to read (papermill failed before or while starting the kernel).
            cell="$(grep -E '^[A-Za-z_.]*(Error|Exception|Interrupt|Exit)[A-Za-z]*:' "$log" | tail -n 1 || true)"
            [[ -n "$cell" ]] || cell="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 || true)"
            cell="none ran: ${cell:-see the log}"
        fi
        {
            echo
            echo "$ME: FAILED: $name (profile $profile) after $secs s"
            echo "  failing cell: $cell"
            [[ -f "$out" ]] && echo "  executed notebook: $(rel "$out")"
            echo "  papermill log: $(rel "$log")"
            echo "  notebooks after it were not run."
        } >&2
        exit 1
    fi
    timings+=("$(printf '%-28s %8s s' "$name" "$secs")")
    echo "<== $name done in $secs s"
done
total="$(awk -v a="$total_start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
echo
echo "all ${#notebooks[@]} notebook(s) ran on profile $profile:"
printf '  %s\n' "${timings[@]}"
echo "  total: $total s; executed notebooks in $(rel "$OUT_DIR")"
