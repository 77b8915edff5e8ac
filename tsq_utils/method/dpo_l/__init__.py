"""DPO-L + SFT (TokenSqueeze §3.3): a length-aware DPO objective mixed with SFT, on TRL 1.16's DPOTrainer.

    L_DPO-L = −log σ( β·Δ + s·λ·log(ℓ(y_l)/ℓ(y_w)) ),   L = η·L_DPO-L + (1 − η)·L_SFT

The objective and its sign conventions: loss.py. The rooms: loss.py (DPOLConfig, the per-pair loss, the two-half
forward), trainer.py (DPOLTrainer), ref_cache.py (reference log-probs shared across trainings), data.py (pairs
tables as TRL datasets), build.py (training_args, make_dpo_l_trainer, reference_log_probs; TrainRun and
TrainerOptions), checkpoints.py (save and resume), train.py (train_and_save, save_trained) and launch.py (training
in several processes under `accelerate launch`).
"""

from .build import (TrainerOptions, TrainRun, deepspeed_enabled, global_batch, make_dpo_l_trainer,
                    master_weights_fp32, num_processes, reference_log_probs, training_args, training_log)
from .checkpoints import _resume_point, _run_fingerprint, checkpoint_settings, last_checkpoint
from .data import PAIR_COLUMNS, _special_tokens_added, pairs_to_dataset
from .launch import (ACCELERATE_CONFIGS, REPO_CONFIGS, accelerate_config_file, deepspeed_config_file, launch_command,
                     launch_training)
from .loss import DPOLConfig, NonFiniteLossError, dpo_l_pair_losses, length_margin, split_forward
from .ref_cache import load_cached_ref_logps, reference_cache_key, save_cached_ref_logps
from .train import save_trained, train_and_save
from .trainer import DPOLTrainer

# _resume_point and _run_fingerprint: the multi-process entry point (train_entry) resumes as train_and_save does;
# _special_tokens_added: TLDR's SFT data makes the same BOS/EOS check
__all__ = [
    "ACCELERATE_CONFIGS", "PAIR_COLUMNS", "REPO_CONFIGS", "DPOLConfig", "DPOLTrainer", "NonFiniteLossError",
    "TrainRun", "TrainerOptions", "_resume_point", "_run_fingerprint", "_special_tokens_added",
    "accelerate_config_file", "checkpoint_settings", "deepspeed_config_file", "deepspeed_enabled",
    "dpo_l_pair_losses", "global_batch", "last_checkpoint", "launch_command", "launch_training", "length_margin",
    "load_cached_ref_logps", "make_dpo_l_trainer", "master_weights_fp32", "num_processes", "pairs_to_dataset",
    "reference_cache_key", "reference_log_probs", "save_cached_ref_logps", "save_trained", "split_forward",
    "train_and_save", "training_args", "training_log",
]
