"""One sampling interface, `sample(...)`: a batched, seeded transformers backend everywhere and vLLM on GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..task.format import thinking_part
from . import compat


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
    return count_tokens(tokenizer, thinking_part(text))


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
    if batch_size < 1:  # a negative step would make the batch loop empty and return blank completions
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if backend == "transformers":
        return _sample_hf(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, seed, stop, batch_size,
                          progress)
    if backend == "vllm":
        return _sample_vllm(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, seed, stop)
    raise ValueError(f"unknown sampling backend {backend!r}: use 'transformers' or 'vllm'")


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a draw from the temperature-scaled, top-p-truncated softmax."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always survives)
        drop = (sp.cumsum(-1) - sp) >= top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _stop_checker(tokenizer, stop: list[str] | None):
    """A function saying whether a row's generated ids end in (contain, in their last few tokens) a stop string."""
    if not stop:
        return None
    width = 4 + max(len(s) for s in stop)  # a stop string spans at most that many tokens

    def hit(ids: list[int]) -> bool:
        tail = tokenizer.decode(ids[-width:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    return hit


# Most rows x positions one prefill forward takes. A forward's transient activations grow with it (one layer's MLP
# and attention tensors), so refinement's 64 rows x 9k-token R1 prefixes are fed in position chunks: 2^16 keeps them
# near 10 GB on the 7B model (benchmarks/bench_memory.py). Every toy batch (512 rows x < 40 prompt tokens; 64 rows x
# < 500 refinement-prefix tokens) fits in one forward, so its results do not change.
PREFILL_CHUNK_TOKENS = 2**16


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            chunk_tokens: int | None = None):
    """Run a left-padded batch's prompt through the model; return (KV cache, logits at the last position [B, V]).

    Only the last position is projected onto the vocabulary (logits_to_keep=1): full logits would cost rows x prompt
    tokens x vocab, 64 x 9k x 152k in bf16 = 175 GB for R1 prefixes, for one row's worth of use. Prompts longer than
    chunk_tokens / rows positions are fed in chunks that extend the cache.
    """
    rows, width = input_ids.shape
    step = max(1, (chunk_tokens or PREFILL_CHUNK_TOKENS) // max(1, rows))
    cache, out = None, None
    for lo in range(0, width, step):
        hi = min(width, lo + step)
        out = compat.forward_with_cache(model, cache, input_ids=input_ids[:, lo:hi],
                                        attention_mask=attention_mask[:, :hi], position_ids=position_ids[:, lo:hi],
                                        use_cache=True, logits_to_keep=1)
        cache = compat.output_cache(out)
    return cache, out.logits[:, -1, :]


@torch.no_grad()
def _decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, temperature: float,
            top_p: float, eos: int, stop_hit, gen: torch.Generator) -> list[tuple[list[int], bool]]:
    """Sample continuations of a left-padded batch; rows that finish leave the batch (and the KV cache) at once.

    transformers' generate keeps every row until the longest one ends and grows its cache by concatenation, which on
    CPU made long-tailed toy batches 4x slower; dropping finished rows makes the cost follow the actual lengths.
    Returns, per row, the generated ids (without EOS) and whether it ended by EOS or a stop string.
    """
    n_rows = input_ids.shape[0]
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache, logits = prefill(model, input_ids, attention_mask, pos)
    logits = logits.float()
    rows = list(range(n_rows))  # original index of each active row
    ids: list[list[int]] = [[] for _ in range(n_rows)]
    ended = [False] * n_rows
    mask, next_pos = attention_mask, pos[:, -1:] + 1
    for t in range(max_new_tokens):
        nxt = _pick(logits, temperature, top_p, gen)
        keep = []
        for a, tok_id in enumerate(nxt.tolist()):
            r = rows[a]
            if tok_id == eos:
                ended[r] = True
                continue
            ids[r].append(tok_id)
            if stop_hit is not None and stop_hit(ids[r]):
                ended[r] = True
                continue
            keep.append(a)
        if not keep or t == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            idx = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(idx)
            rows = [rows[a] for a in keep]
            nxt, mask, next_pos = nxt[idx], mask[idx], next_pos[idx]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = compat.forward_with_cache(model, cache, input_ids=nxt[:, None], attention_mask=mask,
                                        position_ids=next_pos, use_cache=True, logits_to_keep=1)
        next_pos = next_pos + 1
        logits = out.logits[:, -1, :].float()
    return [(ids[r], ended[r]) for r in range(n_rows)]


@torch.no_grad()
def _sample_hf(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, seed, stop, batch_size, progress):
    from tqdm.auto import tqdm

    # Rows sorted by prompt length (stable): similar prompts share a batch, so less padding and, in practice, similar
    # completion lengths. Results go back to their prompt's slot, so the order of the output never changes.
    plen = [len(p) for p in prompts]
    rows = sorted(((i, j) for i in range(len(prompts)) for j in range(n)), key=lambda r: plen[r[0]])
    texts = [[""] * n for _ in prompts]
    reasons = [[""] * n for _ in prompts]
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(rows), batch_size)
        for b, start in enumerate(tqdm(starts, desc="sampling", disable=not progress)):
            chunk = rows[start : start + batch_size]
            enc = tokenizer([prompts[i] for i, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            # one generator per batch, seeded from the run seed: a rerun with the same batching repeats exactly
            gen = torch.Generator(device=device).manual_seed(seed * 100003 + b)
            outs = _decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, temperature, top_p, eos,
                           _stop_checker(tokenizer, stop), gen)
            for (i, j), (ids, ended) in zip(chunk, outs):
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


def vllm_requests(tokenizer, prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int,
                  seed: int, stop: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """vLLM inputs for a batch: token-id prompts and one SamplingParams kwargs dict per prompt, each with its own seed.

    The prompts are tokenized here exactly as the transformers backend does (no special tokens added): the chat
    template already wrote the BOS text, and vLLM's own tokenization of a string would add a second BOS. vLLM seeds
    the n samples of a request seed, seed + 1, ..., seed + n - 1, so prompt i gets seed base + i * n: every
    (prompt, sample) row of the batch draws from its own stream, as rows do in the transformers backend.
    """
    _validate(prompts, n, temperature, top_p, max_new_tokens)
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    inputs = [{"prompt_token_ids": list(x)} for x in ids]
    base = (int(seed) * 1_000_003) % 2**31
    params = [vllm_sampling_params(n, temperature, top_p, max_new_tokens, base + i * n, stop)
              for i in range(len(prompts))]
    return inputs, params


def _sample_vllm(llm, tokenizer, prompts, n, temperature, top_p, max_new_tokens, seed, stop):
    try:
        from vllm import SamplingParams
    except ImportError as e:  # the CPU install has no vLLM
        raise ImportError("the vllm backend needs the GPU extra: pip install -e .[gpu] "
                          "(on a CPU machine use the transformers backend: sampling.backend: transformers)") from e
    inputs, kwargs = vllm_requests(tokenizer, prompts, n, temperature, top_p, max_new_tokens, seed, stop)
    outs = llm.generate(inputs, [SamplingParams(**kw) for kw in kwargs])
    if len(outs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(prompts)} prompts")
    texts, reasons = [], []
    for o in outs:
        # outputs come back in completion order; their index is the sample number within the request
        comps = sorted(o.outputs, key=lambda c: c.index)
        texts.append([c.text for c in comps])
        # "stop" is EOS or a stop string (cut off, as in the transformers backend); "length" and an aborted or
        # unfinished request (None) never count as finished
        reasons.append(["stop" if c.finish_reason == "stop" else "length" for c in comps])
    n_tok = [[count_tokens(tokenizer, t) for t in row] for row in texts]
    n_think = [[think_tokens(tokenizer, t) for t in row] for row in texts]
    return SampleResult(texts, n_tok, reasons, n_think)
