"""Profiles (YAML files under profiles/), run folders, seeds, thread counts and the device.

The profile's keys are defined in core/profile_schema.py, a profile file is read and checked by
core/profile_loader.py and docs/profiles.md is rendered by core/profile_doc.py; this module re-exports their public
names (``from tsq_utils.core.config import Profile, load_profile``) and holds what a run sets up from a profile.
`python -m tsq_utils.core.config --doc` prints docs/profiles.md.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch

from .profile_doc import PROFILES_DOC, main, profile_fields, profile_reference
from .profile_loader import (MAX_PROFILE_VALUES, PROFILES_DIR, REPO_ROOT, SAFE_NAME, ProfileError, available_profiles,
                             load_profile, read_profile_yaml)
from .profile_schema import (AblationsConfig, DataConfig, EvaluationConfig, ModelConfig, PretrainConfig, Profile,
                             RefinementConfig, SamplingConfig, SelectionConfig, TLDRConfig, ToyWorldConfig,
                             TrainingConfig, knob)

__all__ = [
    "PROFILES_DOC", "main", "profile_fields", "profile_reference",
    "MAX_PROFILE_VALUES", "PROFILES_DIR", "REPO_ROOT", "SAFE_NAME", "ProfileError", "available_profiles",
    "load_profile", "read_profile_yaml",
    "AblationsConfig", "DataConfig", "EvaluationConfig", "ModelConfig", "PretrainConfig", "Profile", "RefinementConfig",
    "SamplingConfig", "SelectionConfig", "TLDRConfig", "ToyWorldConfig", "TrainingConfig", "knob",
    "set_threads", "seed_everything", "stage_seed", "runs_root", "run_dir", "figures_dir", "MIN_NVIDIA_DRIVER",
    "ALLOW_CPU_ENV", "NVIDIA_VERSION_FILE", "nvidia_driver_version", "no_gpu_message", "resolve_device",
]


def set_threads(n: int) -> int:
    """Set torch's CPU thread count (0 keeps torch's default); return the count in use."""
    if n > 0:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # already set once in this process
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_seed(run_seed: int, stage: str) -> int:
    """A per-stage seed derived deterministically from the run seed and the stage name."""
    h = hashlib.sha256(f"{run_seed}:{stage}".encode()).hexdigest()
    return int(h[:8], 16) % (2**31 - 1)


def _env_dir(var: str, default: Path) -> Path:
    """An absolute folder from an environment variable; a relative one is taken relative to the repository root.

    Relative to the repository, not the working directory: notebooks run with the notebooks/ folder as theirs,
    the shell that started them elsewhere (run_all.sh makes the variable absolute before it starts any).
    """
    value = os.environ.get(var, "")
    if not value:
        return default
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def runs_root() -> Path:
    """Root of the run folders (TSQ_RUNS_DIR or runs/ in the repo), as an absolute path."""
    return _env_dir("TSQ_RUNS_DIR", REPO_ROOT / "runs")


def run_dir(profile: Profile) -> Path:
    """The run folder of a profile, runs/<profile>/ (created)."""
    d = runs_root() / profile.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def figures_dir(profile: Profile) -> Path:
    """The figure folder of a profile, figures/<profile>/ (created)."""
    d = _env_dir("TSQ_FIGURES_DIR", REPO_ROOT / "figures") / profile.name
    d.mkdir(parents=True, exist_ok=True)
    return d


# The GPU stack's torch and vLLM wheels are CUDA 13.0 builds: they need an NVIDIA driver of at least this version.
MIN_NVIDIA_DRIVER = 580
ALLOW_CPU_ENV = "TSQ_ALLOW_CPU"
NVIDIA_VERSION_FILE = Path("/proc/driver/nvidia/version")


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi, else from /proc/driver/nvidia/version; None when neither has one."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", NVIDIA_VERSION_FILE.read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def no_gpu_message(what: str) -> str:
    """Why torch sees no GPU, as far as can be told: its CUDA build, the NVIDIA driver found, torch's own reason."""
    built = torch.version.cuda
    driver = nvidia_driver_version()
    reason = ""
    if built:
        try:
            torch.cuda.init()
        except Exception as e:  # noqa: BLE001 - its message is the diagnosis
            reason = f" torch says: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}."
    found = (f"torch {torch.__version__} is " + (f"a CUDA {built} build" if built else "a CPU-only build")
             + "; NVIDIA driver " + (driver if driver else "not found (no nvidia-smi, no /proc/driver/nvidia/version)"))
    hint = ""
    if built and driver and driver.split(".")[0].isdigit() and int(driver.split(".")[0]) < MIN_NVIDIA_DRIVER:
        hint = (f" The driver is too old for this build: the GPU extra's torch 2.14 and vLLM 0.33 are CUDA 13.0 builds"
                f" and need driver >= {MIN_NVIDIA_DRIVER}; upgrade the driver or install torch for an older CUDA.")
    elif built and not driver:
        hint = " No NVIDIA driver was found: is this a GPU machine, and is the driver installed?"
    return (f"{what} needs a CUDA GPU, but torch sees none ({found}).{reason}{hint} To run on the CPU anyway (slow, "
            f"for smoke tests), set device: cpu with sampling.backend: transformers, or {ALLOW_CPU_ENV}=1.")


def resolve_device(profile: Profile) -> str:
    """The torch device string a profile asks for ('auto' picks CUDA when present).

    'cuda' without a visible GPU is an error naming the torch CUDA build and the driver found (a GPU profile must not
    quietly run a 7B model on the CPU), unless TSQ_ALLOW_CPU=1 asks for the CPU."""
    if profile.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if profile.device == "cuda" and not torch.cuda.is_available():
        if os.environ.get(ALLOW_CPU_ENV, "") not in ("", "0"):
            warnings.warn(f"profile {profile.name}: no CUDA GPU visible, running on the CPU ({ALLOW_CPU_ENV} is set)",
                          stacklevel=2)
            return "cpu"
        raise RuntimeError(no_gpu_message(f"profile {profile.name} (device: cuda)"))
    return profile.device


if __name__ == "__main__":
    raise SystemExit(main())
