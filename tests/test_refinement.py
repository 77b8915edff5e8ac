"""Tests of tsq_utils.method.refinement: step splitting, the windowed KL and step-wise refinement."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import string
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import tsq_utils.method.refinement as refinement
from tsq_utils.core.config import RefinementConfig, stage_seed
from tsq_utils.method.refinement import (
    RefineOptions,
    Response,
    clean_candidate,
    count_steps,
    join_steps,
    kl_window,
    refine_pairs,
    refine_response,
    refinement_summary,
    split_steps,
    step_parts,
)

PROMPT = "<|user|>\nQ:a5,b+6,c-3\n<|assistant|>\n<think>\n"
TEXT = "a5: start at 5\n\nb+6: 5+6=11\n\nc-3: 11-3=8\n</think>\n\nThe answer is \\boxed{8}."


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok():
    """A character-level fast tokenizer: one token per character, '</think>' and '<think>' one token each."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = string.printable  # letters, digits, punctuation, space, \t \n \r ...
    vocab = {"<pad>": 0, "<unk>": 1, "<|end|>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    t.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>")
    fast.add_tokens(["<think>", "</think>", "<|user|>", "<|assistant|>"])
    return fast


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random Llama whose next-token distributions are far from uniform (large init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    m = LlamaForCausalLM(cfg)
    m.eval()
    return m


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def direct_kl(model, prefix, orig, cand, cont, reduction="mean") -> float:
    """Two unbatched, uncached passes: KL at the predictions of cont[0..L-1] (positions just before them)."""
    def logp(step):
        seq = torch.tensor([prefix + step + cont])
        logits = model(input_ids=seq).logits[0].float()
        start = len(prefix) + len(step) - 1
        return F.log_softmax(logits[start:start + len(cont)], dim=-1)

    with torch.no_grad():
        lo, lc = logp(orig), logp(cand)
    per_pos = (lo.exp() * (lo - lc)).sum(-1)
    return float(per_pos.mean() if reduction == "mean" else per_pos.sum())


class FakeSampler:
    """Stands in for generation.sample: returns fixed candidates per prefix and records every call.

    A prefix is identified by the response it belongs to (its prompt and original steps) and its step
    (its number of preceding original steps); by_step/default/reasons give that step's samples.
    """

    def __init__(self, by_step: dict[int, list[str]] | None = None, default: list[str] | None = None,
                 reasons: dict[int, list[str]] | None = None, prompt: str = PROMPT, steps: list[str] | None = None):
        self.by_step, self.default, self.reasons = by_step or {}, default or [], reasons or {}
        self.prompt, self.steps = prompt, steps
        self.calls: list[dict] = []

    def step_of(self, prefix_text: str) -> int | None:
        """Which step a prefix text conditions (its number of preceding original steps), None if not ours."""
        for i in range(len(self.steps) + 1):
            if self.prompt + "".join(self.steps[:i]) == prefix_text:
                return i
        return None

    def samples(self, i: int, n: int) -> tuple[list[str], list[str]]:
        """The first n fixed samples of step i and their finish reasons."""
        texts = list(self.by_step.get(i, self.default))[:n]
        return texts, list(self.reasons.get(i, ["stop"] * len(texts)))[:n]

    def __call__(self, model, tokenizer, prompts, spec, progress=False):
        return _answer(self, [self], prompts, spec)


class MultiSampler:
    """Dispatches each prefix of one sample call to the FakeSampler of the response it belongs to."""

    def __init__(self, fakes: list[FakeSampler]):
        self.fakes, self.calls = fakes, []

    def __call__(self, model, tokenizer, prompts, spec, progress=False):
        return _answer(self, self.fakes, prompts, spec)


def _answer(recorder, fakes, prompts, spec) -> SimpleNamespace:
    """A SampleResult-like answer from the fakes (spec: generation.Decoding); the call is recorded on recorder.calls."""
    n, stop = spec.n, None if spec.stop is None else list(spec.stop)
    texts, reasons, where = [], [], []
    for prefix in prompts:
        hits = [(r, f.step_of(prefix)) for r, f in enumerate(fakes) if f.step_of(prefix) is not None]
        assert len(hits) == 1, f"prefix is not an original prefix of exactly one response: {prefix!r}"
        r, i = hits[0]
        t, why = fakes[r].samples(i, n)
        texts.append(t)
        reasons.append(why)
        where.append((r, i))
    recorder.calls.append(dict(prompts=list(prompts), steps=[i for _, i in where], where=where, n=n,
                               temperature=spec.temperature, max_new_tokens=spec.max_new_tokens, seed=spec.seed,
                               stop=stop, batch_size=spec.batch_size))
    # the char-level tokenizer: tokens of a sampled text = its characters
    return SimpleNamespace(texts=texts, n_tokens=[[len(x) for x in t] for t in texts], finish_reasons=reasons)


def _refine(model, tok, prompt, text, *, seed=0, grade_fn=None, response_id="", cap_to_original=True,
            sample_batch_size=None, reduction="mean", **cfg):
    """refine_response on one response, its RefinementConfig fields given as keywords (reduction: kl_reduction)."""
    options = RefineOptions(sample_batch_size=sample_batch_size, cap_to_original=cap_to_original)
    return refine_response(model, tok, Response(prompt, text, response_id, grade_fn),
                           RefinementConfig(kl_reduction=reduction, **cfg), seed=seed, options=options)


def install(monkeypatch, text=TEXT, prompt=PROMPT, **kw) -> FakeSampler:
    fake = FakeSampler(prompt=prompt, steps=split_steps(text)[0], **kw)
    monkeypatch.setattr(refinement.sources, "sample", fake)
    return fake


# --------------------------------------------------------------------------- split / join


@pytest.mark.parametrize("text, steps, tail", [
    ("", [], ""),
    ("no think close", ["no think close"], ""),
    (TEXT, ["a5: start at 5\n\n", "b+6: 5+6=11\n\n", "c-3: 11-3=8"], "\n</think>\n\nThe answer is \\boxed{8}."),
    ("a\n\n\nb\n\n\n\nc", ["a\n\n\n", "b\n\n\n\n", "c"], ""),
    ("\n\nlead\n\nx\n\n", ["\n\nlead\n\n", "x\n\n"], ""),
    ("a \n \t\nb\n", ["a \n \t\n", "b\n"], ""),
    ("a\r\n\r\nb", ["a\r\n\r\n", "b"], ""),
    ("x\n\n</think>\n\nans\n\nmore</think>", ["x"], "\n\n</think>\n\nans\n\nmore</think>"),
    ("</think>answer", [], "</think>answer"),
    ("a\nstill a\n\n  indented b</think>", ["a\nstill a\n\n", "  indented b"], "</think>"),
    ("\n\n\n", ["\n\n\n"], ""),
])
def test_split_steps_by_hand(text, steps, tail):
    got_steps, got_tail = split_steps(text)
    assert (got_steps, got_tail) == (steps, tail)
    assert join_steps(got_steps, got_tail) == text


def test_split_join_round_trip_random():
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", "\n", "\n\n", "\r", "</think>", "x=1", "\n \n"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        steps, tail = split_steps(text)
        assert join_steps(steps, tail) == text
        for s in steps:
            body, sep = step_parts(s)
            assert body + sep == s
            assert refinement.THINK_CLOSE not in s
            # a body holds no blank line except blank lines that lead the first step
            assert refinement.STEP_SEP_RE.search(body.lstrip("\n \t\r")) is None
        assert tail == "" or tail.lstrip().startswith("</think>")


def test_split_join_real_r1_traces(shared_data):
    files = sorted(shared_data.glob("aime25_*.jsonl"))
    assert files
    n = 0
    for f in files:
        for line in f.read_text().splitlines():
            text = json.loads(line)["completion"]
            steps, tail = split_steps(text)
            assert join_steps(steps, tail) == text
            assert len(steps) > 5
            if "</think>" in text:
                assert tail.lstrip().startswith("</think>") and tail.strip() != "</think>"
            n += 1
    assert n == 60


def test_step_parts_and_clean_candidate():
    assert step_parts("a\n\n") == ("a", "\n\n")
    assert step_parts("a\nb") == ("a\nb", "")
    assert step_parts("\n\nlead\n \n") == ("\n\nlead", "\n \n")
    assert clean_candidate("x=1\n\nmore") == "x=1"
    assert clean_candidate("x=1 \n</think>\n\nans") == "x=1"
    assert clean_candidate("x\n \ny") == "x"
    assert clean_candidate("\n\n") == ""
    assert count_steps(TEXT) == 3 and count_steps("") == 0


def test_join_steps_rejects_bad_input():
    with pytest.raises(ValueError, match="list of str"):
        join_steps("a\n\nb", "")
    with pytest.raises(ValueError, match="needs a str"):
        split_steps(None)


# --------------------------------------------------------------------------- kl_window


def test_identical_candidate_has_zero_kl(model, tok):
    prefix, step, cont = ids(tok, PROMPT), ids(tok, "b+6: 5+6=11"), ids(tok, "\n\nc-3: 11-3=8\n</think>")
    other = ids(tok, "b+6=11")
    kl = kl_window(model, prefix, step, [step, other, step], cont)
    assert kl.shape == (3,)
    assert abs(kl[0].item()) < 1e-6 and abs(kl[2].item()) < 1e-6
    assert kl[1].item() > 1e-3  # a different step moves the distribution of a peaky model


@pytest.mark.parametrize("use_cache, batch_size", [(True, 16), (False, 16), (True, 2), (False, 1)])
def test_kl_window_matches_direct_two_pass(model, tok, use_cache, batch_size):
    prefix, step, cont = ids(tok, PROMPT + "a5: 5\n\n"), ids(tok, "b+6: 5+6=11"), ids(tok, "\n\nc-3: 11-3=8\n</th")
    cands = [ids(tok, t) for t in ("b+6=11", "b+6: the total was 5 and 5+6=11", "", "11", "b+6: 5+6=11")]
    got = kl_window(model, prefix, step, cands, cont, batch_size=batch_size, use_prefix_cache=use_cache)
    want = torch.tensor([direct_kl(model, prefix, step, c, cont) for c in cands])
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got, want)
    assert got[-1].abs() < 1e-6 and (got[:-1] > 1e-4).all()


def test_kl_sum_is_mean_times_window(model, tok):
    prefix, step = ids(tok, PROMPT), ids(tok, "a5: start at 5")
    cands = [ids(tok, "a5: 5"), ids(tok, "a5"), ids(tok, "we start with a5, so 5")]
    for window in (1, 7, 20):
        cont = ids(tok, "\n\nb+6: 5+6=11\n\nc-3: 11-3=8")[:window]
        mean = kl_window(model, prefix, step, cands, cont, reduction="mean")
        total = kl_window(model, prefix, step, cands, cont, reduction="sum")
        assert torch.allclose(total, mean * window, rtol=1e-5, atol=1e-7)
        want = torch.tensor([direct_kl(model, prefix, step, c, cont, "sum") for c in cands])
        assert torch.allclose(total, want, rtol=1e-4, atol=1e-6)


def test_kl_window_first_prediction_is_at_last_step_token(model, tok):
    # Window of one token: the only prediction compared is the one made at the step's last token,
    # which is the same token ("1") in both contexts at different positions -> generally nonzero KL,
    # and exactly the direct value.
    prefix, cont = ids(tok, PROMPT), ids(tok, "\n")
    orig, cand = ids(tok, "x=11"), ids(tok, "11")
    got = kl_window(model, prefix, orig, [cand], cont).item()
    assert got == pytest.approx(direct_kl(model, prefix, orig, cand, cont), rel=1e-4, abs=1e-7)


def test_kl_window_restores_training_mode(model, tok):
    model.train()
    try:
        kl_window(model, ids(tok, "ab"), ids(tok, "c"), [ids(tok, "d")], ids(tok, "e"))
        assert model.training
    finally:
        model.eval()


def test_kl_window_bad_input(model, tok):
    p, s, c = ids(tok, "ab"), ids(tok, "c"), ids(tok, "d")
    with pytest.raises(ValueError, match="cont_ids is empty"):
        kl_window(model, p, s, [s], [])
    with pytest.raises(ValueError, match="reduction"):
        kl_window(model, p, s, [s], c, reduction="max")
    with pytest.raises(ValueError, match="at least one candidate"):
        kl_window(model, p, s, [], c)
    with pytest.raises(ValueError, match="empty prefix"):
        kl_window(model, [], s, [[]], c)
    with pytest.raises(ValueError, match="token ids"):
        kl_window(model, "ab", s, [s], c)


# --------------------------------------------------------------------------- refine_response


def test_refine_response_keeps_shortest_passing_candidate(model, tok, monkeypatch):
    fake = install(monkeypatch, by_step={
        0: ["a5: 5", "a5", "a5: start at 5 ok fin", "a5: 5\n\nb+6: extra"],
        1: ["b+6=11", "b+6: 5+6=11", "b+6=11"],
        2: ["c-3=8\n"],
    })
    res = _refine(model, tok, PROMPT, TEXT, n_candidates=4, window=16, epsilon=1e9, seed=3)
    # epsilon huge: the shortest candidate that is shorter than the original wins in every step
    assert res.text == "a5\n\nb+6=11\n\nc-3=8\n</think>\n\nThe answer is \\boxed{8}."
    assert not res.reverted and res.n_accepted == 3
    assert res.n_tokens == len(ids(tok, res.text)) and res.n_tokens_original == len(ids(tok, TEXT))
    r0 = res.steps[0]
    assert (r0.step, r0.orig_tokens, r0.new_tokens, r0.accepted) == (0, 14, 2, True)
    # cleaned and de-duplicated candidates; the one longer than the original is not scored (NaN)
    assert r0.cand_tokens == [5, 2, 21] and r0.n_dropped == 0
    assert r0.cand_texts == ["a5: 5", "a5", "a5: start at 5 ok fin"]
    assert r0.kl[0] >= 0 and r0.kl[1] >= 0 and r0.kl[2] != r0.kl[2]
    assert res.steps[1].cand_tokens == [6, 11] and res.steps[1].new_tokens == 6
    # sampling: one call over the original prefixes of all steps, K, stop strings, the largest token cap
    # (original length + slack; each step's own cap is applied afterwards), a seed derived from the seed
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call["steps"] == [0, 1, 2] and call["n"] == 4 and call["stop"] == ["\n\n", "</think>"]
    assert call["max_new_tokens"] == max(14 + 8, 11 + 8, 11 + 8)
    assert call["seed"] == stage_seed(3, "refine-candidates-0")
    assert call["batch_size"] == refinement.SAMPLE_BATCH_SIZE


def test_recorded_kl_is_the_windowed_kl_against_the_original_prefix(model, tok, monkeypatch):
    """Each step's recorded KLs are direct two-pass KLs on (original prefix, step | candidate, next L tokens)."""
    install(monkeypatch, default=["b+6=11", "x", "c-3=8"])
    window = 10
    res = _refine(model, tok, PROMPT, TEXT, n_candidates=3, window=window, epsilon=0.0)
    steps, tail = split_steps(TEXT)
    for i, rec in enumerate(res.steps):
        body, sep = step_parts(steps[i])
        prefix = ids(tok, PROMPT + "".join(steps[:i]))
        cont = ids(tok, sep + "".join(steps[i + 1:]) + tail)[:window]
        assert rec.cand_texts == ["b+6=11", "x", "c-3=8"]
        for cand, kl in zip(rec.cand_texts, rec.kl):
            if len(cand) < len(body):
                assert kl == pytest.approx(direct_kl(model, prefix, ids(tok, body), ids(tok, cand), cont),
                                           rel=1e-4, abs=1e-7)
            else:
                assert kl != kl  # not shorter: not scored


def test_refine_response_epsilon_gates_on_kl(model, tok, monkeypatch):
    install(monkeypatch, default=["a5", "b+6=11", "c-3=8"])
    base = _refine(model, tok, PROMPT, TEXT, n_candidates=3, window=16, epsilon=0.0)
    assert base.text == TEXT and base.n_accepted == 0  # KL < 0 never holds for a different candidate
    kls = [k for r in base.steps for k in r.kl if k == k]
    assert kls and min(kls) > 0
    cut = sorted(kls)[0] + 1e-9  # admits exactly the lowest-KL candidate
    res = _refine(model, tok, PROMPT, TEXT, n_candidates=3, window=16, epsilon=cut)
    assert res.n_accepted == 1
    acc = [r for r in res.steps if r.accepted][0]
    assert acc.kl_chosen == pytest.approx(sorted(kls)[0])


def test_refine_response_identical_rewrite_is_not_shorter(model, tok, monkeypatch):
    steps = split_steps(TEXT)[0]
    install(monkeypatch, by_step={i: [step_parts(s)[0]] for i, s in enumerate(steps)})
    res = _refine(model, tok, PROMPT, TEXT, n_candidates=1, window=8, epsilon=1e9, cap_to_original=False)
    assert res.text == TEXT and res.n_accepted == 0
    assert all(abs(r.kl[0]) < 1e-6 for r in res.steps)  # scored (cap off) and KL 0, but not shorter


def test_refine_response_drops_empty_and_length_limited(model, tok, monkeypatch):
    install(monkeypatch, by_step={0: ["a5", "", "\n\nx", "a"]}, reasons={0: ["length", "stop", "stop", "stop"]})
    res = _refine(model, tok, PROMPT, TEXT, n_candidates=4, window=8, epsilon=1e9)
    r0 = res.steps[0]
    assert r0.n_sampled == 4 and r0.n_dropped == 3 and r0.cand_tokens == [1]
    assert res.text.startswith("a\n\nb+6")


def test_refinement_never_lengthens_property(model, tok, monkeypatch):
    rng = random.Random(1)
    words = ["a5", ":", " 5", "+6", "=11", " so", " total", "\n", "ok", "c-3"]
    for case in range(6):
        n_steps = rng.randint(1, 4)
        body = ["".join(rng.choice(words) for _ in range(rng.randint(1, 6))).strip() or "x" for _ in range(n_steps)]
        seps = [rng.choice(["\n\n", "\n\n\n", "\n \n"]) for _ in range(n_steps - 1)] + [""]
        text = "".join(b + s for b, s in zip(body, seps)) + rng.choice(["", "\n</think>\n\nThe answer is 3."])
        fake_c = {i: ["".join(rng.choice(words) for _ in range(rng.randint(0, 8))) for _ in range(4)]
                  for i in range(n_steps)}
        install(monkeypatch, text=text, by_step=fake_c)
        eps = rng.choice([0.0, 0.05, 1.0, 1e9])
        res = _refine(model, tok, PROMPT, text, n_candidates=4, window=6, epsilon=eps, seed=case)
        assert res.n_tokens <= res.n_tokens_original
        assert len(res.text) <= len(text)  # char-level tokenizer: tokens and characters agree
        new_steps, new_tail = split_steps(res.text)
        assert new_tail == split_steps(text)[1]
        for r in res.steps:
            assert r.new_tokens <= r.orig_tokens
            if r.accepted:
                assert r.new_tokens < r.orig_tokens and r.kl_chosen < eps
                passing = [t for t, k in zip(r.cand_tokens, r.kl) if k == k and k < eps and t < r.orig_tokens]
                assert r.new_tokens == min(passing)


def test_answer_part_is_untouched(model, tok, monkeypatch):
    text = "s1 long step\n\ns2 long step\n</think>\n\nAnswer para one.\n\nAnswer para two \\boxed{1}."
    fake = install(monkeypatch, text=text, default=["s"])
    res = _refine(model, tok, PROMPT, text, n_candidates=2, window=32, epsilon=1e9)
    assert res.text == "s\n\ns\n</think>\n\nAnswer para one.\n\nAnswer para two \\boxed{1}."
    assert fake.calls[0]["steps"] == [0, 1] and len(res.steps) == 2  # the answer paragraphs are never sampled


def test_steps_are_refined_against_the_original_prefix(model, tok, monkeypatch):
    fake = install(monkeypatch, default=["z"])
    res = _refine(model, tok, PROMPT, TEXT, n_candidates=1, window=8, epsilon=1e9)
    assert res.text == "z\n\nz\n\nz\n</think>\n\nThe answer is \\boxed{8}."
    steps = split_steps(TEXT)[0]
    assert [c["prompts"] for c in fake.calls] == [[PROMPT + "".join(steps[:i]) for i in range(3)]]


def test_reverted_response_equals_original(model, tok, monkeypatch):
    install(monkeypatch, default=["z"])
    graded = []
    res = _refine(model, tok, PROMPT, TEXT, n_candidates=1, window=8, epsilon=1e9,
                          grade_fn=lambda t: graded.append(t) or False)
    assert res.reverted and res.revert_reason == "grade"
    assert res.text == TEXT and res.text.encode() == TEXT.encode()
    assert res.n_tokens == res.n_tokens_original
    assert graded == [res.proposed_text] and res.proposed_text != TEXT
    assert res.n_accepted == 3  # the step decisions are kept in the log
    ok = _refine(model, tok, PROMPT, TEXT, n_candidates=1, window=8, epsilon=1e9, grade_fn=lambda t: True)
    assert not ok.reverted and ok.text == ok.proposed_text


def test_skipped_steps(model, tok, monkeypatch):
    text = "x\n\nlonger step"  # no </think>: the last step has no continuation
    fake = install(monkeypatch, text=text, default=["y"])
    res = _refine(model, tok, PROMPT, text, n_candidates=1, window=8, epsilon=1e9)
    assert [r.skipped for r in res.steps] == ["too_short", "no_continuation"]
    assert res.text == text and fake.calls == []


def test_one_sampler_call_applies_each_steps_own_cap(model, tok, monkeypatch):
    # Original steps of 14, 11 and 11 tokens: own caps 22, 19 and 19; the one call runs to 22. A sample
    # whose text reaches a step's own cap would have been cut there ("length"): dropped for that step only.
    fake = install(monkeypatch, by_step={0: ["x" * 20, "x" * 21], 1: ["y" * 19, "y" * 18, "y" * 3],
                                         2: ["z" * 20, "z" * 5]},
                   reasons={2: ["stop", "length"]})
    res = _refine(model, tok, PROMPT, TEXT, n_candidates=3, window=8, epsilon=1e9)
    assert len(fake.calls) == 1 and fake.calls[0]["max_new_tokens"] == 22
    r0, r1, r2 = res.steps
    assert (r0.cand_tokens, r0.n_dropped, r0.n_sampled) == ([20, 21], 0, 3)
    assert (r1.cand_tokens, r1.cand_texts, r1.n_dropped) == ([18, 3], ["y" * 18, "y" * 3], 1)
    assert (r2.cand_tokens, r2.n_dropped, r2.accepted) == ([], 2, False)  # over its cap / hit the limit
    assert res.text == "a5: start at 5\n\nyyy\n\nc-3: 11-3=8\n</think>\n\nThe answer is \\boxed{8}."


def test_refine_response_bad_arguments(model, tok):
    for kw, msg in ((dict(n_candidates=0), "n_candidates"), (dict(window=0), "window"),
                    (dict(epsilon=-1.0), "epsilon"), (dict(reduction="median"), "reduction"),
                    (dict(max_step_tokens=0), "max_step_tokens"), (dict(batch_size=0), "batch_size"),
                    (dict(sample_batch_size=0), "sample_batch_size"), (dict(n_candidates=True), "n_candidates")):
        with pytest.raises(ValueError, match=msg):
            _refine(model, tok, PROMPT, TEXT, **kw)


# --------------------------------------------------------------------------- pairs


def _pairs() -> pd.DataFrame:
    other = "a2: 2\n\nb+1: 2+1=3\n</think>\n\nThe answer is \\boxed{3}."
    rows = [
        dict(problem_id="p0", k=3, prompt=PROMPT, chosen=TEXT, rejected="r1", chosen_tokens=len(TEXT) - 7,
             rejected_tokens=90, p=0.5, chosen_sample_idx=0, rejected_sample_idx=1, kind="pair"),
        dict(problem_id="p0", k=3, prompt=PROMPT, chosen=TEXT, rejected="r2", chosen_tokens=len(TEXT) - 7,
             rejected_tokens=95, p=0.5, chosen_sample_idx=0, rejected_sample_idx=2, kind="pair"),
        dict(problem_id="p1", k=2, prompt=PROMPT.replace("Q:a5,b+6,c-3", "Q:a2,b+1"), chosen=other, rejected="r3",
             chosen_tokens=len(other) - 7, rejected_tokens=80, p=0.25, chosen_sample_idx=4, rejected_sample_idx=5,
             kind="pair"),
    ]
    return pd.DataFrame(rows)


class PrefixSampler:
    """A sampler that answers 'z' to every prefix and records the prefixes of each call (for the pairs tests)."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.batch_sizes: list[int] = []

    def __call__(self, model, tokenizer, prompts, spec, progress=False):
        n = spec.n
        self.calls.append(list(prompts))
        self.batch_sizes.append(spec.batch_size)
        k = len(prompts)
        return SimpleNamespace(texts=[["z"] * n] * k, n_tokens=[[1] * n] * k, finish_reasons=[["stop"] * n] * k)


def test_refine_pairs_refines_each_distinct_response_once(model, tok, monkeypatch):
    fake = PrefixSampler()
    monkeypatch.setattr(refinement.sources, "sample", fake)
    pairs = _pairs()
    cfg = RefinementConfig(n_candidates=2, window=8, epsilon=1e9, batch_size=4)
    graded = []
    out, log = refine_pairs(model, tok, pairs, cfg, seed=7, progress=False,
                            options=RefineOptions(sample_batch_size=96),
                            grade_fn_factory=lambda row: (lambda t: graded.append(row["problem_id"]) or True))
    # one sampler call over the 3 + 2 step prefixes of the two distinct responses, each prefix once
    prefixes = [p + "".join(split_steps(c)[0][:i]) for p, c in dict.fromkeys(zip(pairs["prompt"], pairs["chosen"]))
                for i in range(len(split_steps(c)[0]))]
    assert len(prefixes) == 5 and fake.calls == [prefixes] and fake.batch_sizes == [96]
    assert graded == ["p0", "p1"]
    assert list(out.columns[:len(pairs.columns)]) == list(pairs.columns)
    assert out["chosen_original"].tolist() == pairs["chosen"].tolist()
    assert out["chosen_tokens_original"].tolist() == pairs["chosen_tokens"].tolist()
    assert out["chosen"].iloc[0] == "z\n\nz\n\nz\n</think>\n\nThe answer is \\boxed{8}." == out["chosen"].iloc[1]
    assert out["chosen_tokens"].tolist() == [len(ids(tok, t)) for t in out["chosen"]]
    assert out["refined"].all() and not out["reverted"].any()
    assert out["rejected"].tolist() == pairs["rejected"].tolist()
    assert len(log) == 5 and set(log["response_id"]) == {"p0/0", "p1/4"}
    assert list(log.columns) == list(refinement.STEP_LOG_COLUMNS)

    s = refinement_summary(log, out)
    assert s["n_responses_refined"] == 2 and s["n_steps"] == 5 and s["acceptance_rate"] == 1.0
    orig_steps = [14, 11, 11, 5, 10]  # characters = tokens of each original step body
    assert s["tokens_per_step_before"] == pytest.approx(sum(orig_steps) / 5)
    assert s["tokens_per_step_after"] == 1.0
    assert s["steps_per_response_before"] == 2.5 == s["steps_per_response_after"]
    assert s["responses_reverted"] == 0
    assert s["mean_chosen_tokens_before"] == pytest.approx((len(TEXT) - 7 + len(_pairs()["chosen"][2]) - 7) / 2)
    assert s["mean_chosen_tokens_after"] == pytest.approx(out["chosen_tokens"].iloc[[0, 2]].mean())


def test_refine_pairs_max_responses_and_reverts(model, tok, monkeypatch):
    monkeypatch.setattr(refinement.sources, "sample", PrefixSampler())
    pairs = _pairs()
    cfg = RefinementConfig(n_candidates=2, window=8, epsilon=1e9, max_responses=1)
    out, log = refine_pairs(model, tok, pairs, cfg, seed=7, progress=False,
                            grade_fn_factory=lambda row: (lambda t: False))
    assert out["refined"].tolist() == [True, True, False]
    assert out["reverted"].tolist() == [True, True, False]
    assert out["chosen"].tolist() == pairs["chosen"].tolist()  # reverted or passed through: unchanged
    assert log["reverted"].all() and (log["final_tokens"] == log["orig_tokens"]).all() and log["accepted"].all()
    s = refinement_summary(log, out)
    assert s["responses_reverted"] == 1 and s["tokens_per_step_after"] == s["tokens_per_step_before"]
    # the pairs' counts (characters - 7: '</think>' is one token) agree with the tokenizer ...
    assert s["n_token_count_mismatch"] == 0
    # ... and an unchanged row whose stage-01 count disagrees is reported
    out.loc[2, "chosen_tokens_original"] += 1
    assert refinement_summary(log, out)["n_token_count_mismatch"] == 1


def _three_responses() -> tuple[pd.DataFrame, dict[str, dict]]:
    """A pairs table with three distinct chosen responses (one in two pairs) and fixed samples for each."""
    third = ("Next is a7. The total was 0, so 7.\n\n\n \n\nx\n\nWait, let me check a7: 7. Yes.\n\n"
             "Let me double-check: 7=7.\n</think>\n\nThe answer is \\boxed{7}.")
    pairs = pd.concat([_pairs(), pd.DataFrame([dict(
        problem_id="p2", k=1, prompt=PROMPT.replace("Q:a5,b+6,c-3", "Q:a7"), chosen=third, rejected="r4",
        chosen_tokens=len(third) - 7, rejected_tokens=99, p=0.5, chosen_sample_idx=9, rejected_sample_idx=3,
        kind="pair")])], ignore_index=True)
    samples = {
        "p0": dict(by_step={0: ["a5: 5", "a5", "a5: start at 5 ok", "a5", "", "a5:5"],
                            1: ["b+6=11", "b: 11", "6=11 ok\n\nmore", "b+6: 5+6=11", "", "x" * 30],
                            2: ["c-3=8", "8", "c-3: 11-3=8", "c", "c-3", "=8"]},
                   reasons={1: ["stop", "stop", "stop", "stop", "stop", "length"]}),
        "p1": dict(default=["a2", "b+1=3", "b", "", "2+1=3", "a2: 2"]),
        "p2": dict(by_step={0: ["a7: 7", "Next is a7: 7.", "7", "The total is 7.", "a7", "so 7."],
                            2: ["ok", "Check a7: 7.", "Yes.", "a7 is 7", "7", "fine"],
                            3: ["7=7.", "check 7", "Let me double-check: 7=7", "7", "x", "7=7"]}),
    }
    return pairs, samples


def test_refine_pairs_batched_equals_per_response(model, tok, monkeypatch):
    """With the same samples per step, drawing all steps in one call changes nothing: same texts, records, KLs,
    reverts and step log as refining each response on its own."""
    pairs, samples = _three_responses()
    keys = list(dict.fromkeys(zip(pairs["prompt"], pairs["chosen"], pairs["problem_id"],
                                  pairs["chosen_sample_idx"])))
    assert len(keys) == 3
    fakes = {pid: FakeSampler(prompt=p, steps=split_steps(c)[0], **samples[pid]) for p, c, pid, _ in keys}
    grade = {"p0": True, "p1": False, "p2": True}  # p1's refinement no longer grades: reverted
    params = dict(n_candidates=6, window=12, reduction="mean", temperature=1.0, max_step_tokens=128, batch_size=4)

    def one_at_a_time(epsilon: float) -> list:
        out = []
        for p, c, pid, idx in keys:
            monkeypatch.setattr(refinement.sources, "sample", fakes[pid])
            out.append(_refine(model, tok, p, c, epsilon=epsilon, seed=7, response_id=f"{pid}/{idx}",
                                       grade_fn=lambda t, pid=pid: grade[pid], **params))
        return out

    # an epsilon that admits some scored candidates and not others (the median KL)
    kls = sorted(k for r in one_at_a_time(1e9) for rec in r.steps for k in rec.kl if k == k)
    eps = kls[len(kls) // 2]
    single = one_at_a_time(eps)

    multi = MultiSampler(list(fakes.values()))
    monkeypatch.setattr(refinement.sources, "sample", multi)
    cfg = RefinementConfig(n_candidates=6, window=12, epsilon=eps, kl_reduction="mean", temperature=1.0,
                           max_step_tokens=128, batch_size=4)
    out, log = refine_pairs(model, tok, pairs, cfg, seed=7, progress=False,
                            grade_fn_factory=lambda row: (lambda t: grade[row["problem_id"]]))

    # one call over every sampled step of every response, run to the largest cap
    assert len(multi.calls) == 1
    call = multi.calls[0]
    assert call["where"] == [(r, i) for r, f in enumerate(fakes.values()) for i in range(len(f.steps))
                             if (r, i) != (2, 1)]  # p2's step 1 ("x") has one token: skipped
    assert call["max_new_tokens"] == max(rec.orig_tokens + 8 for r in single for rec in r.steps if not rec.skipped)
    # the test is not vacuous: accepted and rejected steps, dropped samples, a revert, a skipped step
    recs = [rec for r in single for rec in r.steps]
    assert 0 < sum(rec.accepted for rec in recs) < sum(not rec.skipped for rec in recs)
    assert any(rec.n_dropped for rec in recs) and any(rec.skipped for rec in recs)
    assert [r.reverted for r in single] == [False, True, False] and single[0].text != single[0].original_text

    by_key = {(p, c): r for (p, c, _, _), r in zip(keys, single)}
    expect = [by_key[k] for k in zip(pairs["prompt"], pairs["chosen"])]
    assert out["chosen"].tolist() == [r.text for r in expect]
    assert out["chosen_tokens"].tolist() == [r.n_tokens for r in expect]
    assert out["reverted"].tolist() == [r.reverted for r in expect] and out["refined"].all()
    rows = [dict(vars(rec), problem_id=pid, reverted=r.reverted,
                 final_tokens=rec.orig_tokens if r.reverted else rec.new_tokens)
            for (_, _, pid, _), r in zip(keys, single) for rec in r.steps]
    assert len(log) == len(rows)
    for col in refinement.STEP_LOG_COLUMNS:
        # repr compares lists holding NaN (unscored candidates) exactly
        assert repr(log[col].tolist()) == repr([row[col] for row in rows]), col

    # past MAX_STEPS_PER_CALL steps the responses are split between calls (never a response), one seed each:
    # p0 and p1 (3 + 2 sampled steps) in the first call, p2 (3) in the second; the results do not change
    monkeypatch.setattr(refinement.shards, "MAX_STEPS_PER_CALL", 5)
    split = MultiSampler(list(fakes.values()))
    monkeypatch.setattr(refinement.sources, "sample", split)
    out2, log2 = refine_pairs(model, tok, pairs, cfg, seed=7, progress=False,
                              grade_fn_factory=lambda row: (lambda t: grade[row["problem_id"]]))
    assert [sorted({r for r, _ in c["where"]}) for c in split.calls] == [[0, 1], [2]]
    assert [c["seed"] for c in split.calls] == [stage_seed(7, "refine-candidates-0"),
                                                stage_seed(7, "refine-candidates-1")]
    assert sum((c["where"] for c in split.calls), []) == call["where"]
    pd.testing.assert_frame_equal(out2, out)
    pd.testing.assert_frame_equal(log2, log)


def test_refine_pairs_real_sampler_is_deterministic(model, tok):
    """With the real sampler: a one-response table gives refine_response's result for the same seed and batch
    sizes, and a rerun of a many-response table repeats exactly."""
    pairs = _pairs()
    cfg = RefinementConfig(n_candidates=3, window=8, epsilon=1e9, max_step_tokens=12, batch_size=4)
    out1, log1 = refine_pairs(model, tok, pairs.iloc[:1], cfg, seed=5, progress=False,
                              options=RefineOptions(sample_batch_size=5))
    res = _refine(model, tok, PROMPT, TEXT, n_candidates=3, window=8, epsilon=1e9, max_step_tokens=12,
                          seed=5, batch_size=4, sample_batch_size=5, response_id="p0/0")
    assert out1["chosen"].iloc[0] == res.text
    for col in ("cand_tokens", "kl", "n_dropped", "accepted", "new_tokens"):
        assert repr(log1[col].tolist()) == repr([getattr(r, col) for r in res.steps]), col
    assert all(len(r.cand_texts) == len(r.cand_tokens) for r in res.steps)
    assert all(r.n_sampled == 3 for r in res.steps)
    a = refine_pairs(model, tok, pairs, cfg, seed=5, progress=False, options=RefineOptions(sample_batch_size=5))
    b = refine_pairs(model, tok, pairs, cfg, seed=5, progress=False, options=RefineOptions(sample_batch_size=5))
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])


def test_refine_pairs_sample_batch_size_default(model, tok, monkeypatch):
    """Rows per generate call: the argument, else the config's sample_batch_size field if it has one, else the
    module default."""
    from dataclasses import dataclass

    @dataclass
    class WithKnob(RefinementConfig):
        sample_batch_size: int = 48

    for cfg, kw, expect in ((RefinementConfig(n_candidates=2), {}, refinement.SAMPLE_BATCH_SIZE),
                            (WithKnob(n_candidates=2), {}, 48),
                            (WithKnob(n_candidates=2), dict(options=RefineOptions(sample_batch_size=7)), 7)):
        fake = PrefixSampler()
        monkeypatch.setattr(refinement.sources, "sample", fake)
        refine_pairs(model, tok, _pairs(), cfg, seed=0, progress=False, **kw)
        assert fake.batch_sizes == [expect]
    with pytest.raises(ValueError, match="sample_batch_size"):
        refine_pairs(model, tok, _pairs(), RefinementConfig(), seed=0, progress=False,
                     options=RefineOptions(sample_batch_size=0))


def test_a_response_is_never_split_between_sampler_calls(model, tok, monkeypatch):
    fake = PrefixSampler()
    monkeypatch.setattr(refinement.sources, "sample", fake)
    monkeypatch.setattr(refinement.shards, "MAX_STEPS_PER_CALL", 1)  # smaller than either response
    pairs = _pairs()
    out, log = refine_pairs(model, tok, pairs, RefinementConfig(n_candidates=2, window=8, epsilon=1e9), seed=0,
                            progress=False)
    steps0, steps1 = split_steps(TEXT)[0], split_steps(pairs["chosen"][2])[0]
    assert fake.calls == [[PROMPT + "".join(steps0[:i]) for i in range(3)],
                          [pairs["prompt"][2] + "".join(steps1[:i]) for i in range(2)]]
    assert out["refined"].all() and len(log) == 5 and log["accepted"].all()


def test_refine_pairs_disabled_and_bad_table(model, tok, monkeypatch):
    fake = PrefixSampler()
    monkeypatch.setattr(refinement.sources, "sample", fake)
    out, log = refine_pairs(model, tok, _pairs(), RefinementConfig(enabled=False), seed=0, progress=False)
    assert fake.calls == [] and not out["refined"].any() and len(log) == 0
    assert refinement_summary(log, out)["acceptance_rate"] is None
    with pytest.raises(ValueError, match="chosen_sample_idx"):
        refine_pairs(model, tok, _pairs().drop(columns=["chosen_sample_idx"]), RefinementConfig(), seed=0)


def test_refine_with_real_sampler(model, tok):
    """Integration with generation.sample: real candidates are drawn and scored, nothing gets longer."""
    from tsq_utils.model import generation

    assert refinement.sources.sample is generation.sample
    res = _refine(model, tok, PROMPT, TEXT, n_candidates=3, window=8, epsilon=1e9, max_step_tokens=12,
                          seed=0)
    assert res.n_tokens <= res.n_tokens_original
    assert all(r.n_sampled == 3 for r in res.steps)


def test_toy_world_segment_tokenization_equals_whole_text():
    """In the toy world the segment-wise ids (prompt | bodies | separators | tail) are the whole text's ids,
    so the tokenization caveat of the module does not arise there."""
    from tsq_utils.task import toy
    from tsq_utils.model import toy_reasoner
    from tsq_utils.core.config import ToyWorldConfig

    cfg = ToyWorldConfig()
    toy_tok = toy_reasoner.train_tokenizer(cfg, vocab_size=256, n_docs=300, seed=0)
    rng = random.Random(0)
    for _ in range(100):
        p = toy.make_problem(rng, rng.randint(2, 8), cfg.max_value)
        prompt, text = toy.prompt_for(p.question, toy_tok), toy.teacher_trace(p, rng, cfg)
        steps, tail = split_steps(text)
        segments = [prompt] + [x for s in steps for x in step_parts(s)] + [tail]
        seg_ids = [i for s in segments for i in ids(toy_tok, s)]
        assert seg_ids == ids(toy_tok, prompt + text)


def _frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal tables, list cells (with NaN KLs) compared by repr."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        assert repr(a[col].tolist()) == repr(b[col].tolist()), col


def test_rethreshold_equals_a_run_at_that_epsilon(model, tok, tmp_path):
    """A run at one epsilon re-thresholded at another gives that run's tables exactly (real sampler; through a
    parquet round trip of the step log, as the ablation cache stores it)."""
    from tsq_utils.core.artifacts import load_table, save_table

    pairs = _pairs()
    cfg = RefinementConfig(n_candidates=6, window=8, epsilon=math.inf, max_step_tokens=12, batch_size=4)
    grade = lambda row: (lambda text: "q" not in text)  # noqa: E731 -- a deterministic grade that rejects some texts
    _, log_inf = refine_pairs(model, tok, pairs, cfg, seed=3, progress=False,
                              options=RefineOptions(sample_batch_size=8),
                              grade_fn_factory=grade)
    save_table(log_inf, tmp_path / "log.parquet")
    stored = load_table(tmp_path / "log.parquet")
    kls = sorted(v for ks in log_inf["kl"] for v in ks if not math.isnan(v))
    assert len(kls) >= 4
    accepted = []
    for eps in (kls[0] / 2, kls[len(kls) // 2], math.inf):
        c = dataclasses.replace(cfg, epsilon=eps)
        direct = refine_pairs(model, tok, pairs, c, seed=3, progress=False,
                              options=RefineOptions(sample_batch_size=8), grade_fn_factory=grade)
        for log in (log_inf, stored):
            derived = refinement.rethreshold(tok, pairs, log, c, grade_fn_factory=grade)
            _frames_equal(derived[0], direct[0])
            _frames_equal(derived[1], direct[1])
        accepted.append(int(direct[1]["accepted"].sum()))
    assert accepted[0] == 0 < accepted[1] < accepted[2]  # the three thresholds keep different candidates
    # going back down from a run at a finite epsilon works too (every shorter candidate was scored there)
    mid = dataclasses.replace(cfg, epsilon=kls[len(kls) // 2])
    _, log_mid = refine_pairs(model, tok, pairs, mid, seed=3, progress=False,
                              options=RefineOptions(sample_batch_size=8),
                              grade_fn_factory=grade)
    _frames_equal(refinement.rethreshold(tok, pairs, log_mid, cfg, grade_fn_factory=grade)[1], log_inf)


def test_rethreshold_rejects_a_log_of_other_responses(model, tok, monkeypatch):
    monkeypatch.setattr(refinement.sources, "sample", PrefixSampler())
    pairs = _pairs()
    cfg = RefinementConfig(n_candidates=2, window=8, epsilon=1e9)
    _, log = refine_pairs(model, tok, pairs, cfg, seed=7, progress=False)
    with pytest.raises(ValueError, match="does not match its steps"):
        refinement.rethreshold(tok, pairs.assign(chosen=pairs["chosen"].str.replace("a5", "a55")), log, cfg)
    with pytest.raises(ValueError, match="older refinement run"):
        refinement.rethreshold(tok, pairs, log.drop(columns="cand_texts"), cfg)
    # a response the log never refined (max_responses grew) is an error too, not silently left alone
    with pytest.raises(ValueError, match="does not match its steps"):
        refinement.rethreshold(tok, pairs, log[log["response_id"] == "p0/0"], cfg)
