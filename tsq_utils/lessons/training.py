"""Notebook 04, DPO-L training: a sequence's log-probability (what the loss compares) and the summary lines of the
training log."""

from __future__ import annotations

import pandas as pd
import torch


def sequence_logps(model, tokenizer, prompt: str, completion: str, add_eos: bool = True) -> tuple[float, int]:
    """log π(completion | prompt) summed over the completion's tokens (EOS appended, as TRL does), and their count."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        c_ids = c_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([p_ids + c_ids])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float()
    finally:
        model.train(was)
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(c_ids)[:, None]).sum()
    return float(logp), len(c_ids)


def seen_training(log: pd.DataFrame) -> list[str]:
    """Three lines about DPO-L + SFT training from its log."""
    first, last = log.iloc[0], log.iloc[-1]
    tail = log.iloc[-max(1, len(log) // 10):]
    return [
        f"{len(log)} logged steps: the total loss went {first['loss']:.3f} -> {last['loss']:.3f} "
        f"(DPO-L {first['dpo_l_loss']:.3f} -> {last['dpo_l_loss']:.3f}, SFT {first['sft_loss']:.3f} -> "
        f"{last['sft_loss']:.3f}).",
        f"The reward margin β·Δ averaged {tail['rewards/margins'].mean():.2f} nats over the last 10% of steps, with "
        f"reward accuracy {tail['rewards/accuracies'].mean():.2f}: "
        + ("the model now prefers the short chosen responses." if tail["rewards/margins"].mean() > 0
           else "the model does not yet prefer the chosen responses."),
        f"The DPO-L loss starts at {first['dpo_l_loss']:.3f}, above log 2 = 0.693, because with s = -1 the length "
        "term is a margin to beat before any training.",
    ] if "dpo_l_loss" in log else [f"{len(log)} logged steps; final loss {last['loss']:.3f}.",
                                    "The log has no DPO-L term.", "See the figure."]
