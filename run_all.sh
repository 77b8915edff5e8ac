#!/usr/bin/env bash
# Run the whole pipeline: every notebooks/NN_*.ipynb in order, with papermill, on one profile.
# Sets itself up on a fresh machine (Python >= 3.10; 3.11 is the tested one): see usage below.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ME="run_all.sh"

usage() {
    cat <<'EOF'
usage: ./run_all.sh [--profile NAME] [--only NN,NN,...] [-p KEY VALUE ...] [--rerun-on-code-change] [--dry-run]

Runs every notebooks/NN_*.ipynb in order with papermill on one profile, and writes the executed
notebooks to runs/<profile>/notebooks/ (with a .log of papermill's output beside each).

  --profile NAME   the profile, profiles/NAME.yaml (default: toy); also exported as TSQ_PROFILE
  --only LIST      run only these notebooks, by number: --only 00,01 (still in pipeline order)
  -p KEY VALUE     pass a parameter to the notebooks whose parameters cell defines KEY (repeatable),
                   as papermill does: -p alpha 0.3 -p epsilon 0.01 ("profile" is set by --profile).
                   -p NN:KEY VALUE sends it to notebook NN only: a name that two notebooks of the
                   run read differently (eta is training.eta in 04, tldr.eta in 07; lr; max_steps;
                   n_samples; temperature; max_new_tokens) must say which: -p 07:eta 4.
                   Every -p is checked before anything runs: an unknown name (the message names the
                   closest one), an ambiguous one, or a value the profile's ranges refuse stops here.
  --rerun-on-code-change
                   rerun the stages the profile marks expensive (profile key `expensive`: the r1
                   profiles' 01, 03, 04, 05) when only the code they use changed; without it they keep
                   their outputs and the summary says "kept: code changed since <commit>"
  --dry-run, -n    print what would run, set up and run nothing
  -h, --help       this text

First it makes sure .venv exists and holds the package: it creates .venv (python3 -m venv) when
missing and runs `pip install -e .[dev]` when the package is not importable or pyproject.toml
changed since the last install, adding torch==2.13.0 (the CPU wheel) only when the venv holds no
torch inside pyproject's pin (a CUDA torch and vLLM already there are never replaced); then it
installs a Jupyter kernel "tsq" (the venv's Python) that the notebooks run on.

Environment:
  TSQ_SKIP_SETUP=1    skip the venv set-up and use TSQ_PYTHON (default .venv/bin/python) as it is
  TSQ_PYTHON          the interpreter to use with TSQ_SKIP_SETUP=1
  TSQ_KERNEL          the Jupyter kernel to run the notebooks on (default: tsq)
  TSQ_NOTEBOOKS_DIR   where the notebooks are (default: notebooks/)
  TSQ_RUNS_DIR        root of the run folders (default: runs/)

  TSQ_RUNS_DIR and TSQ_FIGURES_DIR may be relative: they are made absolute (against the current
  folder) once, here, so every notebook writes to the same place.

A failing notebook stops the run: the message names the notebook, the failing cell and its
exception, and the executed notebook to open (NN_name.failed.ipynb; the last good run's
NN_name.ipynb and .log are kept). Ctrl-C stops it too, saying at which cell of which notebook.
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
only_set=0
rerun_code=0
dry_run=0
pkeys=()
pvals=()
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
            only_set=1
            shift 2
            ;;
        --only=*)
            only="${1#*=}"
            only_set=1
            shift
            ;;
        --rerun-on-code-change)
            rerun_code=1
            shift
            ;;
        -p | --parameters)
            (($# >= 3)) || die_usage "$1 needs a KEY and a VALUE"
            [[ "$2" =~ ^([0-9][0-9]:)?[A-Za-z_][A-Za-z0-9_]*$ ]] ||
                die_usage "-p $2: the key must be a Python name (a variable of the parameters cell), optionally NN: for one notebook (-p 07:eta 4)"
            [[ "${2#*:}" != "profile" ]] || die_usage "-p profile: use --profile NAME"
            pkeys+=("$2")
            pvals+=("$3")
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
if ((only_set)) && [[ -z "${only//[[:space:],]/}" ]]; then
    die_usage "--only '$only' names no notebook: give numbers (--only 00,01), or leave --only out to run them all"
fi
if ((only_set)); then
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

# Relative folders are resolved once, here: the notebooks run with notebooks/ as their working folder.
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
RUNS_ROOT="$(abspath "${TSQ_RUNS_DIR:-$REPO/runs}")"
export TSQ_RUNS_DIR="$RUNS_ROOT"
[[ -z "${TSQ_FIGURES_DIR:-}" ]] || export TSQ_FIGURES_DIR="$(abspath "$TSQ_FIGURES_DIR")"
OUT_DIR="$RUNS_ROOT/$profile/notebooks"
KERNEL="${TSQ_KERNEL:-tsq}"

# Check the profile and every -p against the notebooks' parameters cells; sets nb_params[NAME]="i j ..."
# (the indices of the -p pairs that notebook NAME gets).
declare -A nb_params=()
check_parameters() {
    local plan line name pairs=() k
    for k in "${!pkeys[@]}"; do pairs+=("${pkeys[$k]}" "${pvals[$k]}"); done
    plan="$("$1" -m tsq_utils.core.runner check "$REPO/profiles/$profile.yaml" "${#notebooks[@]}" "${notebooks[@]}" \
        ${pairs[@]+"${pairs[@]}"})" || {
        echo "$ME: nothing was run: fix the profile or the -p parameters above (./run_all.sh --help)" >&2
        exit 2
    }
    while read -r name line; do nb_params["$name"]="$line"; done <<<"$plan"
}

# The papermill -p arguments of one notebook: profile, then the -p pairs it gets.
nb_args() {
    local name="$1" i
    args=(-p profile "$profile")
    for i in ${nb_params["$name"]:-}; do args+=(-p "${pkeys[$i]#*:}" "${pvals[$i]}"); done
}

if ((dry_run)); then
    dry_py="${TSQ_PYTHON:-$REPO/.venv/bin/python}"
    if "$dry_py" -c 'import tsq_utils.core.runner' >/dev/null 2>&1; then
        check_parameters "$dry_py"
    else
        echo "(parameters not checked: no Python with the package at $dry_py)"
        for nb in "${notebooks[@]}"; do
            nb_params["$(basename "$nb")"]="${!pkeys[*]}"
        done
    fi
    echo "profile $profile, kernel $KERNEL, executed notebooks to $OUT_DIR"
    for nb in "${notebooks[@]}"; do
        nb_args "$(basename "$nb")"
        echo "would run: papermill $nb $OUT_DIR/$(basename "$nb") -k $KERNEL -l python --cwd $NB_DIR ${args[*]}"
    done
    exit 0
fi

# --- set-up -----------------------------------------------------------------------------------
# shellcheck source=scripts/setup_venv.sh
source "$REPO/scripts/setup_venv.sh"
tsq_setup_venv "$REPO" || exit 1

# Validate the profile and the parameters with the real loader now, before any notebook runs.
check_parameters "$TSQ_PY"

export TSQ_PROFILE="$profile"
if ((rerun_code)); then export TSQ_RERUN_ON_CODE_CHANGE=1; else export TSQ_RERUN_ON_CODE_CHANGE=0; fi
if ! mkdir -p "$OUT_DIR" 2>/dev/null || ! [[ -w "$OUT_DIR" ]]; then
    # papermill writes the executed notebooks and their logs here: say so now, not with a log that cannot be written
    echo "$ME: $OUT_DIR is not writable (a read-only run folder?): make it writable, or run into another folder" \
        "(TSQ_RUNS_DIR=/some/dir ./run_all.sh ...); the book and figures of a read-only run can still be built" \
        "(python -m tsq_utils.lessons.book --notebooks $OUT_DIR --out DIR)" >&2
    exit 1
fi

# "cell N (In [k]): Ename: evalue" for the failing cell of an executed notebook (or where it was interrupted).
describe_failure() {
    "$TSQ_PY" -m tsq_utils.core.runner describe "$@" 2>/dev/null || true
}

# Ctrl-C reaches papermill (which stops its kernel); the script itself lives on to say where it stopped.
interrupted=0
trap 'interrupted=1' INT

rel() { local p="$1"; echo "${p#"$REPO"/}"; }

now() { date +%s.%N 2>/dev/null || date +%s; }

# Drops the kernel's "running over TCP without encryption" warning (a kernel papermill starts on localhost for one
# notebook: nothing to act on) and passes everything else on as it comes, progress bars included. One warning is
# one write of the kernel's log, so it never straddles two reads. Ignores Ctrl-C, like tee -i, to keep the tail.
quiet_kernel() {
    "$TSQ_PY" -c '
import os, re, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
tcp = re.compile(rb"\[IPKernelApp\] WARNING \| Kernel is running over TCP without encryption\.[^\r\n]*\n?")
while chunk := os.read(0, 1 << 16):
    os.write(1, tcp.sub(b"", chunk))
'
}

declare -a timings=()
total_start="$(now)"
i=0
echo "running ${#notebooks[@]} notebook(s) on profile $profile (kernel $KERNEL); executed notebooks in $(rel "$OUT_DIR")"
for nb in "${notebooks[@]}"; do
    i=$((i + 1))
    name="$(basename "$nb")"
    out="$OUT_DIR/$name"
    log="$OUT_DIR/${name%.ipynb}.log"
    # Written under temporary names and moved into place on success: a failed run keeps the last good one. The
    # names are this run's own (pid), so two runs of one notebook never write or move each other's files.
    run_out="$OUT_DIR/.${name%.ipynb}.running.$$.ipynb"
    run_log="$OUT_DIR/.${name%.ipynb}.running.$$.log"
    rm -f "$run_out" "$run_log"
    nb_args "$name"
    echo "==> [$i/${#notebooks[@]}] $name"
    start="$(now)"
    set +e
    # tee -i: a Ctrl-C must not cut the log short
    "$TSQ_PY" -m papermill "$nb" "$run_out" -k "$KERNEL" -l python --cwd "$NB_DIR" "${args[@]}" 2>&1 | quiet_kernel \
        | tee -i "$run_log"
    rc=${PIPESTATUS[0]}
    set -e
    secs="$(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
    ((rc != 130)) || interrupted=1
    if ((rc == 0 && interrupted)); then
        # Ctrl-C after the notebook's last cell: it completed, so it is kept as the good run; the rest is not run
        mv -f "$run_out" "$out"
        mv -f "$run_log" "$log"
        rm -f "$OUT_DIR/${name%.ipynb}.failed.ipynb" "$OUT_DIR/${name%.ipynb}.failed.log"
        echo "$ME: interrupted after $name completed (profile $profile; kept: $(rel "$out")); notebooks after it were not run." >&2
        exit 130
    fi
    if ((rc != 0 || interrupted)); then
        failed_out="$OUT_DIR/${name%.ipynb}.failed.ipynb"
        failed_log="$OUT_DIR/${name%.ipynb}.failed.log"
        [[ -f "$run_out" ]] && mv -f "$run_out" "$failed_out"
        [[ -f "$run_log" ]] && mv -f "$run_log" "$failed_log"
        if ((interrupted)) || grep -q '^KeyboardInterrupt' "$failed_log" 2>/dev/null; then
            interrupted=1
            cell="$(describe_failure "$failed_out" interrupted)"
            [[ -n "$cell" ]] || cell="interrupted before the first cell ran (while the kernel started)"
        elif grep -q 'DeadKernelError' "$failed_log" 2>/dev/null; then
            # a killed kernel (SIGKILL, the out-of-memory killer) leaves no error in the notebook: name the cell
            cell="$(describe_failure "$failed_out" died)"
        else
            cell="$(describe_failure "$failed_out")"
        fi
        if [[ -z "$cell" ]]; then
            # No executed notebook to read (papermill failed before or while starting the kernel).
            cell="$(grep -E '^[A-Za-z_.]*(Error|Exception|Exit)[A-Za-z]*:' "$failed_log" | tail -n 1 || true)"
            [[ -n "$cell" ]] || cell="$(grep -v -e '^[[:space:]]*$' -e 'Executing:' "$failed_log" | tail -n 1 || true)"
            cell="none ran: ${cell:-see the log}"
        fi
        {
            echo
            if ((interrupted)); then
                first="${cell%%$'\n'*}"
                echo "$ME: ${first} of notebook $name (profile $profile) after $secs s${cell#"$first"}"
            else
                echo "$ME: FAILED: $name (profile $profile) after $secs s"
                echo "  failing cell: $cell"
            fi
            [[ -f "$failed_out" ]] && echo "  executed notebook: $(rel "$failed_out")"
            echo "  papermill log: $(rel "$failed_log")"
            [[ -f "$out" ]] && echo "  the last good run's notebook is kept: $(rel "$out")"
            echo "  notebooks after it were not run."
        } >&2
        ((interrupted)) && exit 130
        exit 1
    fi
    mv -f "$run_out" "$out"
    mv -f "$run_log" "$log"
    rm -f "$OUT_DIR/${name%.ipynb}.failed.ipynb" "$OUT_DIR/${name%.ipynb}.failed.log"
    # an expensive stage that kept its outputs despite a code change says so in its set-up output
    kept="$(grep -o 'kept: code changed since [^"]*pass --rerun-on-code-change' "$out" | head -n 1 || true)"
    timings+=("$(printf '%-28s %8s s' "$name" "$secs")${kept:+   ${kept}}")
    echo "<== $name done in $secs s"
done
total="$(awk -v a="$total_start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
echo
echo "all ${#notebooks[@]} notebook(s) ran on profile $profile:"
printf '  %s\n' "${timings[@]}"
echo "  total: $total s; executed notebooks in $(rel "$OUT_DIR")"
