"""A continuous-batching decode engine over a model's own weights, for Llama and Qwen2 models (the toy reasoner).

`generation.sample(backend="transformers")` uses it for every model `FastDecoder.for_model` accepts and keeps the
transformers loop for the rest. The engine:

- holds a preallocated KV cache of `slots` rows (K and V per layer, [slots, kv_heads, capacity, head_dim]);
- runs one batched decode step over all slots per token: embedding, RMSNorm, RoPE from the model's own rotary
  module (so the config's rope type and scaling are HF's), grouped-query attention over each slot's cache with
  per-slot lengths, SiLU MLP, final norm, tied or untied head (with its bias, if any);
- prefills each prompt once (positions 0..P-2, one forward per prompt, shared by its n samples) and feeds the
  prompt's last token through the decode step, so every sampled token comes out of the same batched step;
- refills a finished row's slot at once with the next waiting row; stop checks are on token ids (EOS, and a
  precomputed token-level automaton for stop strings: generation._stop_table), so the hot loop has no per-row
  Python; per-row Python runs only when a row enters or leaves;
- when no row waits any more and at most half the slots are busy, compacts the busy ones into fewer slots (at
  most log2(slots / MIN_SLOTS) times per call) so that the long tail does not pay for empty slots.

Float invariance (what makes the results independent of batch size, slot and neighbours): a row's logits depend
only on its own tokens when (1) every matmul has at least MIN_SLOTS rows (MKL's sgemm gives a row the same bits
for any M >= 16 on this box; smaller M takes another kernel), (2) the attention window is a multiple of
WINDOW_ALIGN (the masked tail then adds exact zeros in the same order; with grouped-query attention, where each
matmul has several query rows, MKL also splits the position sum into blocks whose bounds move with the window past
~384 positions, so p @ V is summed over fixed PV_CHUNK-position chunks in order) and (3) a prompt's prefill is one
forward of that prompt alone. tests/test_fast_decode.py checks the consequence (same samples for batch sizes 16..512 and
for shards); another BLAS or a GPU may break (1), and the samples then agree statistically, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

MIN_SLOTS = 32  # >= 16 rows per matmul keeps a row's bits independent of the batch (see the module docstring)
WINDOW_ALIGN = 16  # attention windows are multiples of this
PV_CHUNK = 256  # grouped-query attention sums p @ V over fixed chunks of this many positions
GROUP = 64  # slots per attention group: each group attends over the window of its own longest row
RESORT_EVERY = 32  # steps between sorting the slots by length (so that a group's rows have similar lengths)
SUPPORTED_TYPES = ("llama", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rope types whose cos/sin do not change with the length


def _plain_linear(mod: Any) -> bool:
    return type(mod) is torch.nn.Linear


class FastDecoder:
    """The weights of a Llama/Qwen2 causal LM, read once, with a batched decode step and a one-prompt prefill."""

    def __init__(self, model: Any):
        self.model = model
        cfg = model.config
        base = model.model
        self.embed = base.embed_tokens.weight
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.rotary = base.rotary_emb
        a0 = base.layers[0].self_attn
        self.H = cfg.num_attention_heads
        self.KVH = getattr(cfg, "num_key_value_heads", None) or self.H
        self.hd = getattr(a0, "head_dim", None) or cfg.hidden_size // self.H
        self.G = self.H // self.KVH
        self.scale = float(getattr(a0, "scaling", self.hd ** -0.5))
        self.layers = []
        for layer in base.layers:
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                ln1=(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                ln2=(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                q=(at.q_proj.weight, at.q_proj.bias), k=(at.k_proj.weight, at.k_proj.bias),
                v=(at.v_proj.weight, at.v_proj.bias), o=(at.o_proj.weight, at.o_proj.bias),
                gate=(mlp.gate_proj.weight, mlp.gate_proj.bias), up=(mlp.up_proj.weight, mlp.up_proj.bias),
                down=(mlp.down_proj.weight, mlp.down_proj.bias)))
        self.norm = (base.norm.weight, base.norm.variance_epsilon)
        head = model.get_output_embeddings()
        self.head = (head.weight, head.bias)
        self.n_layers = len(self.layers)
        self._rope_cap, self._cos, self._sin = 0, None, None

    # ------------------------------------------------------------------ support
    @staticmethod
    def unsupported(model: Any) -> str | None:
        """Why the engine cannot run this model (None: it can)."""
        cfg = getattr(model, "config", None)
        mt = getattr(cfg, "model_type", None)
        if mt not in SUPPORTED_TYPES:
            return f"model_type {mt!r} (supported: {', '.join(SUPPORTED_TYPES)})"
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return f"hidden_act {cfg.hidden_act!r}"
        if getattr(cfg, "pretraining_tp", 1) not in (1, None):
            return "pretraining_tp > 1"
        layer_types = getattr(cfg, "layer_types", None) or ()
        if getattr(cfg, "use_sliding_window", False) or "sliding_attention" in layer_types:
            return "sliding-window attention"
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rtype = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rtype not in STATIC_ROPE:
            return f"rope_type {rtype!r} (its cos/sin depend on the sequence length)"
        base = getattr(model, "model", None)
        if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return "not a plain *ForCausalLM (no model.embed_tokens/layers/norm/rotary_emb)"
        if not _plain_linear(model.get_output_embeddings()):
            return "the output head is not a plain nn.Linear"
        for layer in base.layers:
            at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            mods = [getattr(at, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            mods += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            if not all(_plain_linear(m) for m in mods):
                return "a projection is not a plain nn.Linear (quantized, LoRA or fused)"
            for n in ("q_norm", "k_norm"):
                if getattr(at, n, None) is not None:
                    return f"attention has {n}"
        return None

    @classmethod
    def for_model(cls, model: Any) -> "FastDecoder | None":
        """The engine for this model, or None when it is not supported (the caller falls back to transformers)."""
        return None if cls.unsupported(model) is not None else cls(model)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _rms(x: torch.Tensor, w_eps) -> torch.Tensor:
        w, eps = w_eps
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return w * x.to(dt)

    @staticmethod
    def _lin(x: torch.Tensor, wb) -> torch.Tensor:
        return F.linear(x, wb[0], wb[1])

    @staticmethod
    def _rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def rope(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [capacity, head_dim] from the model's own rotary module."""
        if capacity > self._rope_cap:
            pos = torch.arange(capacity, device=self.device)[None]
            cos, sin = self.rotary(self.embed[:1][None], pos)
            self._cos, self._sin, self._rope_cap = cos[0], sin[0], capacity
        return self._cos, self._sin

    # ------------------------------------------------------------------ forwards
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, with_logits: bool = False):
        """One prompt [T] through the model: (K, V per layer as [kv_heads, T, head_dim], logits [T, V] or None)."""
        T = ids.shape[0]
        cos, sin = self.rope(T)
        cos, sin = cos[:T][None], sin[:T][None]  # [1, T, hd]
        h = F.embedding(ids, self.embed)
        causal = torch.full((T, T), float("-inf"), device=self.device).triu(1)
        ks, vs = [], []
        for L in self.layers:
            x = self._rms(h, L["ln1"])
            q = self._lin(x, L["q"]).view(T, self.H, self.hd).transpose(0, 1)  # [H, T, hd]
            k = self._lin(x, L["k"]).view(T, self.KVH, self.hd).transpose(0, 1)
            v = self._lin(x, L["v"]).view(T, self.KVH, self.hd).transpose(0, 1)
            q, k = self._rot(q, cos, sin), self._rot(k, cos, sin)
            ks.append(k.contiguous())
            vs.append(v.contiguous())
            qg = q.reshape(self.KVH, self.G, T, self.hd)
            sc = (qg @ k[:, None].transpose(-1, -2)) * self.scale + causal
            p = torch.softmax(sc.float(), dim=-1).to(self.dtype)
            a = (p @ v[:, None]).reshape(self.H, T, self.hd).transpose(0, 1).reshape(T, self.H * self.hd)
            h = h + self._lin(a, L["o"])
            x = self._rms(h, L["ln2"])
            h = h + self._lin(F.silu(self._lin(x, L["gate"])) * self._lin(x, L["up"]), L["down"])
        logits = self._lin(self._rms(h, self.norm), self.head) if with_logits else None
        return ks, vs, logits

    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: torch.Tensor, K: list, V: list, window) -> torch.Tensor:
        """One token per slot: write its K/V at pos, attend over [0, pos], return logits [slots, V].

        window: the attention window (a multiple of WINDOW_ALIGN above every pos), or a list of (first slot, end
        slot, window) groups, each attending over its own window (slots sorted by length waste less)."""
        S = tok.shape[0]
        groups = [(0, S, window)] if isinstance(window, int) else window
        cos, sin = self.rope(K[0].shape[2])
        c, s = cos[pos][:, None], sin[pos][:, None]  # [S, 1, hd]
        wmax = max(g[2] for g in groups)
        bias = torch.where(torch.arange(wmax, device=self.device)[None] > pos[:, None], float("-inf"), 0.0)
        biases = [bias[g0:g1, None, None, :w] for g0, g1, w in groups]  # [g, 1, 1, W]: 0 or -inf (later positions)
        # where each slot's new K/V row goes in the flat [slots * kv_heads * capacity, head_dim] view of the cache
        cap = K[0].shape[2]
        flat = ((torch.arange(S, device=self.device) * self.KVH)[:, None]
                + torch.arange(self.KVH, device=self.device)[None]) * cap + pos[:, None]
        flat = flat.reshape(-1)
        h = F.embedding(tok, self.embed)
        for li, L in enumerate(self.layers):
            x = self._rms(h, L["ln1"])
            q = self._rot(self._lin(x, L["q"]).view(S, self.H, self.hd), c, s)
            k = self._rot(self._lin(x, L["k"]).view(S, self.KVH, self.hd), c, s)
            v = self._lin(x, L["v"]).view(S, self.KVH, self.hd)
            K[li].view(-1, self.hd).index_copy_(0, flat, k.reshape(-1, self.hd))
            V[li].view(-1, self.hd).index_copy_(0, flat, v.reshape(-1, self.hd))
            qg = q.view(S, self.KVH, self.G, self.hd)
            parts = []
            for (g0, g1, w), bias in zip(groups, biases):
                sc = (qg[g0:g1] @ K[li][g0:g1, :, :w].transpose(-1, -2)) * self.scale + bias  # [g, KVH, G, W]
                p = torch.softmax(sc.float(), dim=-1).to(self.dtype)
                vw = V[li][g0:g1, :, :w]
                if self.G == 1 or w <= PV_CHUNK:
                    parts.append(p @ vw)
                else:  # fixed position chunks summed in order: BLAS's own K-blocking would depend on w (docstring)
                    acc = p[..., :PV_CHUNK] @ vw[:, :, :PV_CHUNK]
                    for c0 in range(PV_CHUNK, w, PV_CHUNK):
                        acc = acc + p[..., c0:c0 + PV_CHUNK] @ vw[:, :, c0:c0 + PV_CHUNK]
                    parts.append(acc)
            a = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(S, self.H * self.hd)
            h = h + self._lin(a, L["o"])
            x = self._rms(h, L["ln2"])
            h = h + self._lin(F.silu(self._lin(x, L["gate"])) * self._lin(x, L["up"]), L["down"])
        return self._lin(self._rms(h, self.norm), self.head)

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, slots: int,
                 draw: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 row_keys: Callable[[int], tuple[int, int]], stops: Stops,
                 on_row: Callable[[], None] | None = None) -> list[tuple[list[int], bool]]:
        """Sample n continuations of every prompt with continuous batching; return, per row r = i * n + j, the
        generated ids (without EOS) and whether it ended by EOS or a stop string.

        draw(logits [S, V], key1 [S], key2 [S], t [S]) picks each slot's token (t: its index in the completion);
        row_keys(r) gives row r's two 32-bit stream keys; stops says how a row ends early (Stops); on_row() is
        called as each row finishes."""
        if len(prompt_ids) * n == 0:
            return []
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("the fast decoder needs non-empty prompts (at least one token each)")
        run = _Run(self, prompt_ids, n, max_new_tokens, slots, row_keys)
        run.enter(list(range(run.S)))
        steps = 0
        while True:
            if steps % RESORT_EVERY == RESORT_EVERY - 1 and run.S > GROUP:
                run.resort()
            steps += 1
            groups = run.groups()
            window = max(g[2] for g in groups)
            logits = self.step(run.tok, run.pos, run.K, run.V, groups)
            done, is_eos, hit = run.advance(draw(logits, run.k1, run.k2, run.t), stops)
            if bool(done.any()):
                run.retire(done, is_eos, hit, stops.confirm, on_row)
                n_active = sum(r >= 0 for r in run.slot_row)
                if n_active == 0:
                    break
                if run.nxt_row >= run.R and n_active <= run.S // 2 and run.S > MIN_SLOTS:
                    run.compact(window)
        return run.results  # type: ignore[return-value]


@dataclass(frozen=True)
class Stops:
    """How a row ends before max_new_tokens: its EOS id, and the stop-string automaton table[state, token] (the next
    state; -1: a stop string was completed) with confirm(ids), which double-checks a hit on the decoded text."""

    eos: int | None
    table: torch.Tensor | None = None
    confirm: Callable[[list[int]], bool] | None = None


def _align(x: int) -> int:
    """The attention window over positions 0..x: the next multiple of WINDOW_ALIGN above x."""
    return -(-(x + 1) // WINDOW_ALIGN) * WINDOW_ALIGN


class _Run:
    """The state of one FastDecoder.generate call: the slots' KV cache and per-slot tensors (next token, position,
    token index t, key lanes, stop-automaton state, activity, generated ids), which row each slot holds, the results."""

    def __init__(self, dec: FastDecoder, prompt_ids: list[list[int]], n: int, max_new_tokens: int, slots: int,
                 row_keys: Callable[[int], tuple[int, int]]) -> None:
        self.dec, self.prompt_ids, self.n, self.row_keys = dec, prompt_ids, n, row_keys
        self.max_new_tokens = max_new_tokens
        dev = self.dev = dec.device
        R = self.R = len(prompt_ids) * n
        S = self.S = max(MIN_SLOTS, min(slots, R))
        longest = max(len(p) for p in prompt_ids)
        cap = -(-(longest + max_new_tokens) // WINDOW_ALIGN) * WINDOW_ALIGN
        dec.rope(cap)
        self.K = [torch.zeros(S, dec.KVH, cap, dec.hd, dtype=dec.dtype, device=dev) for _ in range(dec.n_layers)]
        self.V = [torch.zeros_like(k) for k in self.K]
        z = lambda: torch.zeros(S, dtype=torch.long, device=dev)  # noqa: E731
        self.tok, self.pos, self.t, self.k1, self.k2, self.st = z(), z(), z(), z(), z(), z()
        self.active = torch.zeros(S, dtype=torch.bool, device=dev)
        self.out = torch.zeros(S, max_new_tokens, dtype=torch.long, device=dev)
        self.slot_row = [-1] * S
        self.results: list[tuple[list[int], bool] | None] = [None] * R
        self.nxt_row = 0
        self.pre = {"i": -1, "k": None, "v": None}  # the last prompt prefilled (its n rows may enter in two calls)
        self.ar = torch.arange(S, device=dev)

    def enter(self, free: list[int]) -> None:
        """Fill free slots with the next waiting rows (grouped by prompt: one prefill serves its n rows)."""
        take = free[: self.R - self.nxt_row]
        if not take:
            return
        dev, n = self.dev, self.n
        rows = list(range(self.nxt_row, self.nxt_row + len(take)))
        self.nxt_row += len(take)
        for s_, r in zip(take, rows):
            self.slot_row[s_] = r
        idx = torch.tensor(take, device=dev)
        keys = [self.row_keys(r) for r in rows]
        self.k1[idx] = torch.tensor([a for a, _ in keys], device=dev)
        self.k2[idx] = torch.tensor([b for _, b in keys], device=dev)
        self.t[idx], self.st[idx], self.active[idx] = 0, 0, True
        last, ppos = [], []
        g = 0
        while g < len(rows):  # rows of one prompt are consecutive
            i = rows[g] // n
            h = g
            while h < len(rows) and rows[h] // n == i:
                h += 1
            ids = self.prompt_ids[i]
            P = len(ids)
            if P > 1:
                self._copy_prefill(i, idx[g:h])
            last += [ids[-1]] * (h - g)
            ppos += [P - 1] * (h - g)
            g = h
        self.tok[idx] = torch.tensor(last, device=dev)
        self.pos[idx] = torch.tensor(ppos, device=dev)

    def _copy_prefill(self, i: int, sl: torch.Tensor) -> None:
        """Write prompt i's K/V (all its tokens but the last) into slots sl, prefilling it unless it was the last."""
        pre, ids = self.pre, self.prompt_ids[i]
        P = len(ids)
        if pre["i"] != i:
            pre["k"], pre["v"], _ = self.dec.prefill(torch.tensor(ids[:-1], device=self.dev))
            pre["i"] = i
        for li in range(self.dec.n_layers):
            self.K[li][sl, :, : P - 1] = pre["k"][li]
            self.V[li][sl, :, : P - 1] = pre["v"][li]

    def resort(self) -> None:
        """Longest rows first, idle slots last: groups of GROUP slots then have similar lengths."""
        S = self.S
        pl, act = self.pos.tolist(), self.active.tolist()
        order = sorted(range(S), key=lambda a: -pl[a] if act[a] else 1)
        if order == list(range(S)):
            return
        oi = torch.tensor(order, device=self.dev)
        w_all = _align(max(pl))
        for li in range(self.dec.n_layers):
            self.K[li][:, :, :w_all] = self.K[li][oi, :, :w_all]
            self.V[li][:, :, :w_all] = self.V[li][oi, :, :w_all]
        (self.tok, self.pos, self.t, self.k1, self.k2, self.st, self.active, self.out) = (
            x[oi] for x in (self.tok, self.pos, self.t, self.k1, self.k2, self.st, self.active, self.out))
        self.slot_row = [self.slot_row[a] for a in order]

    def groups(self) -> list[tuple[int, int, int]]:
        """(first slot, end slot, attention window) of each group of GROUP slots."""
        S, pl = self.S, self.pos.tolist()
        return [(g0, min(S, g0 + GROUP), _align(max(pl[g0:g0 + GROUP]))) for g0 in range(0, S, GROUP)]

    def advance(self, nxt: torch.Tensor, stops: Stops) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Record each slot's drawn token and move it on; return (done, is_eos, hit) per slot."""
        self.out[self.ar, self.t.clamp(max=self.max_new_tokens - 1)] = nxt
        is_eos = nxt == stops.eos if stops.eos is not None else torch.zeros_like(self.active)
        if stops.table is not None:
            st = stops.table[self.st, nxt]
            hit = st < 0
            self.st = st.clamp(min=0)
        else:
            hit = torch.zeros_like(self.active)
        self.t = self.t + 1
        done = self.active & (is_eos | hit | (self.t >= self.max_new_tokens))
        self.tok = nxt
        self.pos = (self.pos + 1) * self.active
        return done, is_eos, hit

    def retire(self, done: torch.Tensor, is_eos: torch.Tensor, hit: torch.Tensor,
               confirm_stop: Callable[[list[int]], bool] | None, on_row: Callable[[], None] | None) -> None:
        """Store the finished slots' rows and refill their slots (a token-level stop hit that the decoded text does
        not confirm goes on)."""
        free = []
        d_idx = done.nonzero().flatten().tolist()
        e_l, h_l, t_l = is_eos[d_idx].tolist(), hit[d_idx].tolist(), self.t[d_idx].tolist()
        for s_, e, hh, tt in zip(d_idx, e_l, h_l, t_l):
            ids = self.out[s_, : tt - 1 if e else tt].tolist()
            stopped = bool(hh and not e and (confirm_stop is None or confirm_stop(ids)))
            if hh and not e and not stopped and tt < self.max_new_tokens:
                continue  # a token-level false alarm: the decoded text has no stop string; go on
            self.results[self.slot_row[s_]] = (ids, bool(e or stopped))
            self.slot_row[s_] = -1
            free.append(s_)
            if on_row is not None:
                on_row()
        if free:
            fi = torch.tensor(free, device=self.dev)
            self.active[fi] = False
            self.pos[fi] = 0
            self.enter(free)

    def compact(self, window: int) -> None:
        """Move the busy slots to the front and drop the idle tail (no row waits any more)."""
        keep = [s_ for s_ in range(self.S) if self.slot_row[s_] >= 0]
        S = self.S = max(MIN_SLOTS, -(-len(keep) // 16) * 16)
        ki = torch.tensor(keep, device=self.dev)
        m = len(keep)

        def sq(x: torch.Tensor) -> torch.Tensor:
            x[:m] = x[ki]  # busy slots to the front (ki is ascending), in place; the rest are idle
            if S > m:
                x[m:S] = 0
            return x[:S]

        for li in range(self.dec.n_layers):  # only the used window of the cache moves
            self.K[li][:m, :, :window] = self.K[li][ki, :, :window]
            self.V[li][:m, :, :window] = self.V[li][ki, :, :window]
        self.K, self.V = [x[:S] for x in self.K], [x[:S] for x in self.V]
        (self.tok, self.pos, self.t, self.k1, self.k2, self.st, self.active, self.out) = map(
            sq, (self.tok, self.pos, self.t, self.k1, self.k2, self.st, self.active, self.out))
        self.slot_row = [self.slot_row[s_] for s_ in keep] + [-1] * (S - m)
        self.ar = torch.arange(S, device=self.dev)
