"""The sampling interface: seeding, greedy batching, token counts, stop strings, finish reasons, argument checks,
vLLM."""

import copy
import importlib.util
import random

import pytest
from conftest import tiny_toy_model
import torch

from tsq_utils.task import toy as tw
from tsq_utils.model.generation import (
    Decoding,
    SampleResult,
    count_tokens,
    sample,
    think_tokens,
    vllm_requests,
    vllm_sampling_params,
)


@pytest.fixture(scope="module")
def tok(tiny_toy_tokenizer):
    """The shared tiny toy tokenizer (conftest)."""
    return tiny_toy_tokenizer


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random Llama with large weights: its greedy output varies from token to token (a 0.02-std init
    repeats one token, which would make the greedy tests vacuous)."""
    m = tiny_toy_model(tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def prompts(tok):
    """Prompts of different lengths (k = 2, 8, 4), so a batch needs left padding."""
    rng = random.Random(0)
    ps = [tw.prompt_for(tw.make_problem(rng, k).question, tok) for k in (2, 8, 4)]
    lengths = [count_tokens(tok, p) for p in ps]
    assert len(set(lengths)) == 3
    return ps


def with_eos_bias(model, tok, bias: float):
    """A copy of the model whose output layer adds `bias` to the EOS logit (an untied head with a bias)."""
    m = copy.deepcopy(model)
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.model.embed_tokens.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = bias
    m.lm_head = head
    return m


def test_result_shape_and_counts(model, tok, prompts):
    res = sample(model, tok, prompts, Decoding(n=3, temperature=1.0, max_new_tokens=12, seed=0, batch_size=4))
    assert isinstance(res, SampleResult)
    for field in (res.texts, res.n_tokens, res.finish_reasons, res.n_think_tokens):
        assert len(field) == len(prompts) and all(len(row) == 3 for row in field)
    for texts, ntok, nthink in zip(res.texts, res.n_tokens, res.n_think_tokens):
        for t, n, nt in zip(texts, ntok, nthink):
            assert n == count_tokens(tok, t)
            assert nt == think_tokens(tok, t)
            # re-tokenising a decoded completion usually needs no more tokens than were generated; a sampled
            # non-canonical BPE sequence can re-tokenize into a few more
            assert n <= 2 * 12


def test_decoding_is_a_hashable_value(model, tok, prompts):
    """Stop strings as a list or a tuple make the same (hashable) spec and the same samples; no spec is Decoding()."""
    a = Decoding(n=2, max_new_tokens=10, seed=1, stop=["e"])
    b = Decoding(n=2, max_new_tokens=10, seed=1, stop=("e",))
    assert a == b and hash(a) == hash(b) and a.stop == ("e",)
    assert sample(model, tok, prompts, a) == sample(model, tok, prompts, b)
    assert sample(model, tok, prompts) == sample(model, tok, prompts, Decoding())
    with pytest.raises(AttributeError):
        a.n = 3  # frozen: a stage's spec cannot change under it


def test_same_seed_same_samples(model, tok, prompts):
    kw = dict(n=4, temperature=1.0, max_new_tokens=16, batch_size=5)
    a = sample(model, tok, prompts, Decoding(seed=7, **kw))
    b = sample(model, tok, prompts, Decoding(seed=7, **kw))
    assert a == b
    c = sample(model, tok, prompts, Decoding(seed=8, **kw))
    assert c.texts != a.texts
    # the n samples of one prompt are not copies of each other
    assert all(len(set(row)) > 1 for row in a.texts)


def test_greedy_is_batch_invariant(model, tok, prompts):
    """Left padding must not change greedy output: batched equals one prompt at a time."""
    batched = sample(model, tok, prompts, Decoding(n=2, temperature=0, max_new_tokens=24, batch_size=6))
    for i, p in enumerate(prompts):
        alone = sample(model, tok, [p], Decoding(n=1, temperature=0, max_new_tokens=24, batch_size=1))
        assert batched.texts[i] == alone.texts[0] * 2
        assert batched.finish_reasons[i] == alone.finish_reasons[0] * 2
    # and the prompts' completions differ (the model is not emitting one constant string)
    assert len({row[0] for row in batched.texts}) == len(prompts)
    # a different batch size or seed changes nothing for greedy
    again = sample(model, tok, prompts, Decoding(n=2, temperature=0, max_new_tokens=24, batch_size=2, seed=3))
    assert again == batched


def test_tiny_top_p_is_greedy(model, tok, prompts):
    """top_p reaches the sampler: keeping only the top token is greedy decoding."""
    greedy = sample(model, tok, prompts, Decoding(n=1, temperature=0, max_new_tokens=16))
    nucleus = sample(model, tok, prompts, Decoding(n=2, temperature=1.0, top_p=1e-9, max_new_tokens=16, seed=5))
    assert nucleus.texts == [row * 2 for row in greedy.texts]


def test_max_new_tokens_gives_length(model, tok, prompts):
    never = with_eos_bias(model, tok, -1e4)  # no EOS, so every sample runs to the limit
    res = sample(never, tok, prompts, Decoding(n=2, temperature=1.0, max_new_tokens=5, seed=1))
    assert all(r == "length" for row in res.finish_reasons for r in row)
    assert all(1 <= n <= 5 for row in res.n_tokens for n in row)


def test_eos_gives_stop_and_is_not_in_text(model, tok, prompts):
    always = with_eos_bias(model, tok, 1e4)
    res = sample(always, tok, prompts, Decoding(n=2, temperature=1.0, max_new_tokens=8, seed=0))
    assert res.texts == [["", ""]] * 3 and res.n_tokens == [[0, 0]] * 3
    assert res.finish_reasons == [["stop", "stop"]] * 3
    # a moderate bias: some samples end early on EOS ("stop"), others run to the limit ("length")
    some = with_eos_bias(model, tok, 4.0)
    res = sample(some, tok, prompts, Decoding(n=8, temperature=1.0, max_new_tokens=20, seed=0))
    reasons = [r for row in res.finish_reasons for r in row]
    assert "stop" in reasons and "length" in reasons
    for row_t, row_r in zip(res.texts, res.finish_reasons):
        for t, r in zip(row_t, row_r):
            assert tok.eos_token not in t and tok.pad_token not in t
            if r == "stop":
                assert count_tokens(tok, t) < 20


def test_stop_string_cuts_text(model, tok, prompts):
    full = sample(model, tok, prompts, Decoding(n=1, temperature=0, max_new_tokens=30))
    text = full.texts[0][0]
    assert len(text) >= 12, text  # room for a stop string well inside it (the random model may end early: EOS)
    # a stop string whose first occurrence is well inside the greedy completion
    stop = next(text[i:i + 3] for i in range(5, len(text) - 3) if text.find(text[i:i + 3]) == i)
    cut = sample(model, tok, prompts[:1], Decoding(n=1, temperature=0, max_new_tokens=30, stop=[stop, "\x00never"]))
    assert cut.texts[0][0] == text[: text.find(stop)]
    assert stop not in cut.texts[0][0]
    assert cut.finish_reasons[0] == ["stop"]
    assert cut.n_tokens[0][0] == count_tokens(tok, cut.texts[0][0])


def test_stop_strings_in_sampling(model, tok, prompts):
    res = sample(model, tok, prompts, Decoding(n=4, temperature=1.0, max_new_tokens=30, seed=2, stop=["e", "t"]))
    for row_t, row_r in zip(res.texts, res.finish_reasons):
        for t, r in zip(row_t, row_r):
            assert "e" not in t and "t" not in t
    assert "stop" in [r for row in res.finish_reasons for r in row]


def test_state_restored(model, tok, prompts):
    tok.padding_side = "right"
    model.train()
    try:
        sample(model, tok, prompts, Decoding(n=1, temperature=0, max_new_tokens=4))
        assert tok.padding_side == "right" and model.training
    finally:
        tok.padding_side = "left"
        model.eval()


def test_think_tokens(tok):
    text = "a5: 5\n\nb+6: 5+6=11\n</think>\n\nThe answer is \\boxed{11}."
    assert think_tokens(tok, text) == count_tokens(tok, "a5: 5\n\nb+6: 5+6=11\n")
    assert think_tokens(tok, "a5: 5") == count_tokens(tok, "a5: 5")  # no </think>: all of it is thinking
    assert count_tokens(tok, "") == 0
    assert count_tokens(tok, "\n\n") == 1


@pytest.mark.parametrize("kw,phrase", [
    (dict(n=0), "n must be"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=-1), "batch_size"),
])
def test_bad_arguments(model, tok, prompts, kw, phrase):
    with pytest.raises(ValueError, match=phrase):
        sample(model, tok, prompts, Decoding(**kw))


@pytest.mark.parametrize("bad", ["one prompt as a string", [1, 2], [None]])
def test_prompts_must_be_a_list_of_strings(model, tok, bad):
    with pytest.raises(ValueError, match="prompts"):
        sample(model, tok, bad)


def test_unknown_backend(model, tok, prompts):
    with pytest.raises(ValueError, match=r"unknown sampling backend 'sglang'"):
        sample(model, tok, prompts, backend="sglang")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm(model, tok, prompts):
    with pytest.raises(ImportError, match=r"\.\[gpu\]"):
        sample(model, tok, prompts, backend="vllm")


def test_vllm_sampling_params():
    kw = vllm_sampling_params(n=4, temperature=1, top_p=0.9, max_new_tokens=300, seed=11, stop=["</think>"])
    assert kw == {"n": 4, "temperature": 1.0, "top_p": 0.9, "max_tokens": 300, "seed": 11, "stop": ["</think>"]}
    assert isinstance(kw["temperature"], float)
    kw = vllm_sampling_params(n=1, temperature=0, top_p=1.0, max_new_tokens=7, seed=0)
    assert kw["max_tokens"] == 7 and kw["seed"] == 0 and "stop" not in kw
    # a tuple of stop strings becomes a list
    assert vllm_sampling_params(1, 1.0, 1.0, 5, 0, stop=("x",))["stop"] == ["x"]


def test_vllm_requests(tok, prompts):
    """Token-id prompts as the transformers backend encodes them, and a distinct seed per (prompt, sample) stream."""
    inputs, params = vllm_requests(tok, prompts, Decoding(n=3, temperature=1.0, max_new_tokens=50, seed=4,
                                                          stop=["</think>"]))
    assert [x["prompt_token_ids"] for x in inputs] == [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert all(kw["max_tokens"] == 50 and kw["n"] == 3 and kw["stop"] == ["</think>"] for kw in params)
    # vLLM seeds sample j of a request with seed + j: the streams of different prompts never overlap
    streams = [kw["seed"] + j for kw in params for j in range(3)]
    assert len(set(streams)) == len(streams)
    assert vllm_requests(tok, prompts, Decoding(3, 1.0, 1.0, 50, seed=4))[1][0]["seed"] == params[0]["seed"]
    assert vllm_requests(tok, prompts, Decoding(3, 1.0, 1.0, 50, seed=5))[1][0]["seed"] != params[0]["seed"]
    # seed_per_request=False: no request carries a seed (vLLM's fast path)
    assert all("seed" not in kw for kw in vllm_requests(tok, prompts, Decoding(3, seed_per_request=False))[1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        vllm_requests(tok, prompts, Decoding(3, 1.0, 1.0, 0, seed=4))


def test_prefill_keeps_only_the_last_positions_logits(model, tok, prompts, monkeypatch):
    """Memory-safe generation (the transformers loop, used for models the fast engine does not take): no forward
    (prefill or step) builds logits for more than the last position."""
    from tsq_utils.model import generation

    monkeypatch.setattr(generation, "_fast_decoder", lambda m: None)
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _inp, out: seen.append(tuple(out.shape)))
    try:
        res = sample(model, tok, prompts, Decoding(n=2, temperature=1.0, max_new_tokens=5, seed=0, batch_size=4))
    finally:
        handle.remove()
    assert res.texts and len(seen) >= 2
    longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert longest > 1  # the prefill has more than one position: keeping one is a real cut
    assert all(s[1] == 1 and s[2] == len(tok) for s in seen), seen
    assert seen[0][0] == 4  # the first forward is a full batch's prefill


def test_chunked_prefill_equals_one_forward(model, tok, prompts):
    """Long prompts are prefilled in position chunks that extend the KV cache: the same last-position logits and the
    same next-step logits as one forward over the whole (left-padded) prompt, and no forward exceeds the budget."""
    from tsq_utils.model import compat
    from tsq_utils.model.generation import prefill

    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = "right"
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    widths = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _m, a: widths.append(a[0].shape))
    try:
        whole_cache, whole = prefill(model, ids, mask, pos)
        assert len(widths) == 1
        budget = 2 * ids.shape[0] + 1  # two positions per forward for these 3 rows
        chunk_cache, chunked = prefill(model, ids, mask, pos, chunk_tokens=budget)
    finally:
        handle.remove()
    assert ids.shape[1] > 4 and len(widths) == 1 + -(-ids.shape[1] // 2)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    nxt = whole.argmax(-1)[:, None]
    step_mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
    a = compat.forward_with_cache(model, whole_cache, input_ids=nxt, attention_mask=step_mask,
                                  position_ids=pos[:, -1:] + 1, use_cache=True).logits
    b = compat.forward_with_cache(model, chunk_cache, input_ids=nxt, attention_mask=step_mask,
                                  position_ids=pos[:, -1:] + 1, use_cache=True).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
