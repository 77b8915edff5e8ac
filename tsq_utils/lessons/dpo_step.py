"""One batch of the package's DPO-L trainer, for notebook 04's training step written out by hand."""

from __future__ import annotations

import tempfile

import pandas as pd
import torch

from ..core.config import TrainingConfig
from ..method import dpo_l


def package_batch(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer, pairs: pd.DataFrame,
                  cfg: TrainingConfig, seed: int) -> tuple[dpo_l.DPOLTrainer, dict[str, torch.Tensor]]:
    """The package's DPO-L trainer on the first cfg.batch_size pairs, and the first batch as its collator builds it
    (the chosen rows, then the rejected rows), on the policy's device."""
    with tempfile.TemporaryDirectory() as out:  # the trainer saves nothing (save_strategy "no"), but needs a folder
        trainer = dpo_l.make_dpo_l_trainer(policy, reference, tokenizer, pairs.head(cfg.batch_size), cfg, out,
                                           dpo_l.TrainRun(seed=seed, device=policy.device.type, max_steps=1))
        batch = next(iter(trainer.get_train_dataloader()))
    return trainer, {k: v.to(policy.device) if torch.is_tensor(v) else v for k, v in batch.items()}
