"""Training in several processes (one per GPU): the accelerate and DeepSpeed config files, the `accelerate launch`
command line, and the launch of tsq_utils.method.train_entry on a job file."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pandas as pd
import torch

from ...core.artifacts import atomic_write_json, load_table, save_table
from ...core.config import REPO_ROOT, TrainingConfig
from .build import TrainRun, num_processes
from .checkpoints import _resume_point, _run_fingerprint
from .data import PAIR_COLUMNS

# The profile's training.accelerate_config choices (core/config.py is their one home)
ACCELERATE_CONFIGS = next(f.metadata["choices"] for f in fields(TrainingConfig) if f.name == "accelerate_config")
REPO_CONFIGS = REPO_ROOT / "configs" / "accelerate"


def accelerate_config_file(name: str):
    """configs/accelerate/<name>.yaml (ddp, zero2, zero3 or fsdp2)."""
    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"unknown accelerate config {name!r}: use one of {list(ACCELERATE_CONFIGS)}")
    return REPO_ROOT / "configs" / "accelerate" / f"{name}.yaml"


def deepspeed_config_file(name: str):
    """configs/accelerate/ds_<name>.json, the DeepSpeed config a zero2/zero3 accelerate config names (bf16 with fp32
    gradient accumulation); None for ddp and fsdp2."""
    return REPO_CONFIGS / f"ds_{name}.json" if name.startswith("zero") else None


def launch_command(job_file, cfg: TrainingConfig, device: str) -> list[str]:
    """The `accelerate launch` command line that runs tsq_utils.method.train_entry on a job file in num_processes
    processes."""
    n = num_processes(cfg)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if device == "cpu":
        # CPU (tests, a laptop): plain DDP over gloo, launched through torch's elastic launcher as on GPUs
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", "1"]
    else:
        name = cfg.accelerate_config
        cmd += ["--config_file", str(accelerate_config_file(name))]
        if deepspeed_config_file(name) is not None:  # the yaml's path is relative to the repository root
            cmd += ["--deepspeed_config_file", str(deepspeed_config_file(name))]
    cmd += ["--num_processes", str(n), "--main_process_port", str(_free_port()),
            "-m", "tsq_utils.method.train_entry", "--job", str(job_file)]
    return cmd


def _free_port() -> int:
    """A TCP port free on this machine now (the launched processes' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_streaming(cmd: list[str]) -> int:
    """Run cmd and print its output line by line here: in a notebook the launched processes' own stdout and stderr
    would go to the kernel's terminal, not to the cell. Progress bars are off there (TQDM_DISABLE); the main process
    prints a line per twentieth of the run instead (train_entry.StepPrinter)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
        return proc.wait()


def launch_training(model, tokenizer, pairs: pd.DataFrame, cfg: TrainingConfig, stage_dir, run: TrainRun,
                    model_subdir: str = "model") -> pd.DataFrame:
    """train_and_save in training.num_processes processes: write a job file, `accelerate launch` the training entry
    point (tsq_utils.method.train_entry) on it, and return the log it wrote. The in-process model only names the
    weights (run.ref_cache and run.progress are for in-process training)."""
    seed, device, max_steps = run.seed, run.device, run.max_steps
    stage_dir = Path(stage_dir)
    ref = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not ref or not Path(ref).is_dir() and "/" not in ref:
        raise ValueError(f"cannot tell which weights the training processes should load (model.name_or_path={ref!r})")
    job_dir = stage_dir / ".launch"
    job_dir.mkdir(parents=True, exist_ok=True)
    save_table(pairs[list(PAIR_COLUMNS)].reset_index(drop=True), job_dir / "pairs.parquet")
    job = {"model": str(ref), "tokenizer": str(getattr(tokenizer, "name_or_path", "") or ref),
           "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
           "training": dataclasses.asdict(cfg), "seed": seed, "max_steps": max_steps, "device": device,
           "pairs": str(job_dir / "pairs.parquet"), "stage_dir": str(stage_dir), "model_subdir": model_subdir,
           "log": str(job_dir / "training_log.parquet"), "compact_progress": True,
           "resume": _resume_point(stage_dir / ".trainer",
                                   _run_fingerprint(pairs, cfg, seed, max_steps, num_processes(cfg)))}
    atomic_write_json(job_dir / "job.json", job)
    if device == "cuda":  # the processes need the GPU memory the notebook's copy holds
        model.to("cpu")
        torch.cuda.empty_cache()
    cmd = launch_command(job_dir / "job.json", cfg, device)
    print("launching:", " ".join(cmd), flush=True)
    code = _run_streaming(cmd)
    if code != 0:
        raise RuntimeError(f"the {num_processes(cfg)}-process training failed (exit {code}); its output "
                           f"is above. Job file: {job_dir / 'job.json'}")
    log = load_table(job["log"]).set_index("step")
    shutil.rmtree(stage_dir / ".trainer", ignore_errors=True)
    shutil.rmtree(job_dir, ignore_errors=True)
    return log
