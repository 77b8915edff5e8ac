"""Pairs tables as TRL preference datasets: the plain-text (prompt, chosen, rejected) columns TRL tokenizes, and the
checks of what it tokenized (EOS ids, pairs that max_length truncates)."""

from __future__ import annotations

import warnings

import pandas as pd
from datasets import Dataset

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def _special_tokens_added(tokenizer) -> tuple[bool, bool]:
    """Whether encoding with the default add_special_tokens=True prepends BOS / appends EOS."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    special = tokenizer(probe)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and special[:1] == [bos] and plain[:1] != [bos]
    adds_eos = eos is not None and special[-1:] == [eos] and plain[-1:] != [eos]
    return adds_bos, adds_eos


def pairs_to_dataset(pairs: pd.DataFrame, tokenizer) -> Dataset:
    """The preference dataset (prompt, chosen, rejected as plain text) TRL tokenizes, from a pairs table."""
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs table lacks column(s) {missing}; it has {list(pairs.columns)}")
    if len(pairs) == 0:
        raise ValueError("pairs table is empty: there is nothing to train on")
    for col in PAIR_COLUMNS:
        bad = pairs.index[~pairs[col].map(lambda v: isinstance(v, str) and len(v) > 0)]
        if len(bad):
            raise ValueError(f"pairs column {col!r} must hold non-empty strings; bad rows: {list(bad[:5])}")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: TRL appends it to every completion")
    adds_bos, adds_eos = _special_tokens_added(tokenizer)
    if adds_eos:
        raise ValueError("the tokenizer appends EOS on every encode; TRL would then end completions with two EOS")
    prompts = pairs["prompt"].tolist()
    if adds_bos:
        # TRL encodes plain-text prompts with add_special_tokens=True; a chat-formatted prompt already starts with
        # the BOS text, so strip it to keep a single BOS (the sequence generation sees with add_special_tokens=False)
        bos = tokenizer.bos_token
        if not all(p.startswith(bos) for p in prompts):
            warnings.warn("the tokenizer prepends BOS but some prompts do not start with it: training sees a BOS "
                          "that generation with add_special_tokens=False does not", stacklevel=2)
        prompts = [p[len(bos):] if p.startswith(bos) else p for p in prompts]
    return Dataset.from_dict({"prompt": prompts, "chosen": pairs["chosen"].tolist(),
                              "rejected": pairs["rejected"].tolist()})


def _check_prepared(dataset: Dataset, tokenizer, max_length: int, name: str) -> None:
    """Check TRL's tokenized pairs end with the EOS id; warn about pairs that max_length truncates."""
    eos = tokenizer.eos_token_id
    first = dataset[0]
    if first["chosen_ids"][-1:] != [eos] or first["rejected_ids"][-1:] != [eos]:
        raise ValueError(f"the EOS text {tokenizer.eos_token!r} does not tokenize to the EOS id {eos}; "
                         "TRL appends it as text, so it must be a special (added) token")
    n_long = 0
    for batch in dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).iter(batch_size=512):
        n_long += sum(len(p) + max(len(c), len(r)) > max_length
                      for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]))
    if n_long:
        warnings.warn(f"{n_long} of {len(dataset)} {name} pairs exceed max_length={max_length} tokens and are "
                      "truncated: their losses and length margins use the truncated completions", stacklevel=3)
