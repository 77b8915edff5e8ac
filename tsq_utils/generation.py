"""One sampling interface, `sample(...)`: a batched, seeded transformers backend everywhere and vLLM on GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

THINK_CLOSE = "</think>"


@dataclass
class SampleResult:
    texts: list[list[str]]  # [prompt][sample]
    n_tokens: list[list[int]]
    finish_reasons: list[list[str]]  # "stop" (EOS or a stop string) or "length"
    n_think_tokens: list[list[int]] = field(default_factory=list)


def count_tokens(tokenizer, text: str) -> int:
    """Tokenizer tokens of a completion text (no special tokens added)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def think_tokens(tokenizer, text: str) -> int:
    """Tokens of the thinking part (everything before </think>; the whole text when it is absent)."""
    cut = text.find(THINK_CLOSE)
    return count_tokens(tokenizer, text if cut < 0 else text[:cut])


def _cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """Cut a text at the first stop string (excluded); say whether one was found."""
    if not stop:
        return text, False
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not hits:
        return text, False
    return text[: min(hits)], True


def _validate(prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def sample(model: Any, tokenizer: Any, prompts: list[str], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
           max_new_tokens: int = 256, seed: int = 0, stop: list[str] | None = None, batch_size: int = 64,
           backend: str = "transformers", progress: bool = False) -> SampleResult:
    """Sample n completions per prompt; temperature 0 means greedy. Same seed and batch size, same samples."""
    _validate(prompts, n, temperature, top_p, max_new_tokens)
    if backend == "transformers":
        return _sample_hf(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, seed, stop, batch_size, progress)
    if backend == "vllm":
        return _sample_vllm(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, seed, stop)
    raise ValueError(f"unknown sampling backend {backend!r}: use 'transformers' or 'vllm'")


@torch.no_grad()
def _sample_hf(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, seed, stop, batch_size, progress):
    from tqdm.auto import tqdm

    rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
    texts = [[""] * n for _ in prompts]
    reasons = [[""] * n for _ in prompts]
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(rows), batch_size)
        for b, start in enumerate(tqdm(starts, desc="sampling", disable=not progress)):
            chunk = rows[start : start + batch_size]
            enc = tokenizer([prompts[i] for i, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            # one seed per batch, derived from the run seed: a rerun with the same batching repeats exactly
            torch.manual_seed(seed * 100003 + b)
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
            if temperature == 0:
                kwargs.update(do_sample=False)
            else:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            if stop:
                kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
            out = model.generate(**enc, **kwargs)
            gen = out[:, enc["input_ids"].shape[1] :]
            for r, (i, j) in enumerate(chunk):
                ids = gen[r].tolist()
                ended = eos in ids
                if ended:
                    ids = ids[: ids.index(eos)]
                while ids and ids[-1] == pad:
                    ids.pop()
                text = tokenizer.decode(ids, skip_special_tokens=True)
                text, hit = _cut_at_stop(text, stop)
                texts[i][j] = text
                reasons[i][j] = "stop" if (ended or hit) else "length"
    finally:
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    n_tok = [[count_tokens(tokenizer, t) for t in row] for row in texts]
    n_think = [[think_tokens(tokenizer, t) for t in row] for row in texts]
    return SampleResult(texts, n_tok, reasons, n_think)


def vllm_sampling_params(n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                         stop: list[str] | None = None) -> dict:
    """The keyword arguments of vllm.SamplingParams for one request (max_tokens always set: vLLM's default is 16)."""
    kw = dict(n=n, temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_new_tokens), seed=int(seed))
    if stop:
        kw["stop"] = list(stop)
    return kw


def _sample_vllm(llm, tokenizer, prompts, n, temperature, top_p, max_new_tokens, seed, stop):
    try:
        from vllm import SamplingParams
    except ImportError as e:  # the CPU install has no vLLM
        raise ImportError("the vllm backend needs the GPU extra: pip install -e .[gpu]") from e
    params = SamplingParams(**vllm_sampling_params(n, temperature, top_p, max_new_tokens, seed, stop))
    outs = llm.generate(prompts, params)
    texts, reasons = [], []
    for o in outs:
        texts.append([c.text for c in o.outputs])
        reasons.append(["length" if c.finish_reason == "length" else "stop" for c in o.outputs])
    n_tok = [[count_tokens(tokenizer, t) for t in row] for row in texts]
    n_think = [[think_tokens(tokenizer, t) for t in row] for row in texts]
    return SampleResult(texts, n_tok, reasons, n_think)
