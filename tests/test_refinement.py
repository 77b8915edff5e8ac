"""Tests of tsq_utils.refinement: step splitting, the windowed KL and step-wise refinement."""

from __future__ import annotations

import json
import random
import string
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import tsq_utils.refinement as refinement
from tsq_utils.config import RefinementConfig
from tsq_utils.refinement import (
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
    """Stands in for generation.sample: returns fixed candidates per prefix and records every call."""

    def __init__(self, by_step: dict[int, list[str]] | None = None, default: list[str] | None = None,
                 reasons: dict[int, list[str]] | None = None, prompt: str = PROMPT, steps: list[str] | None = None):
        self.by_step, self.default, self.reasons = by_step or {}, default or [], reasons or {}
        self.prompt, self.steps = prompt, steps
        self.calls: list[dict] = []

    def step_of(self, prefix_text: str) -> int:
        """Which step a prefix text conditions (its number of preceding original steps)."""
        for i in range(len(self.steps) + 1):
            if self.prompt + "".join(self.steps[:i]) == prefix_text:
                return i
        raise AssertionError(f"prefix is not an original prefix: {prefix_text!r}")

    def __call__(self, model, tokenizer, prompts, n=1, temperature=1.0, max_new_tokens=256, seed=0, stop=None,
                 **kw):
        assert len(prompts) == 1
        i = self.step_of(prompts[0]) if self.steps is not None else len(self.calls)
        self.calls.append(dict(prompt=prompts[0], n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                               seed=seed, stop=stop, step=i))
        texts = list(self.by_step.get(i, self.default))[:n]
        reasons = list(self.reasons.get(i, ["stop"] * len(texts)))
        return SimpleNamespace(texts=[texts], n_tokens=[[len(t) for t in texts]], finish_reasons=[reasons])


def install(monkeypatch, text=TEXT, prompt=PROMPT, **kw) -> FakeSampler:
    fake = FakeSampler(prompt=prompt, steps=split_steps(text)[0], **kw)
    monkeypatch.setattr(refinement, "sample", fake)
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
        0: ["a5: 5", "a5", "a5: start at 5 ok fine", "a5: 5\n\nb+6: extra"],
        1: ["b+6=11", "b+6: 5+6=11", "b+6=11"],
        2: ["c-3=8\n"],
    })
    res = refine_response(model, tok, PROMPT, TEXT, n_candidates=4, window=16, epsilon=1e9, seed=3)
    # epsilon huge: the shortest candidate that is shorter than the original wins in every step
    assert res.text == "a5\n\nb+6=11\n\nc-3=8\n</think>\n\nThe answer is \\boxed{8}."
    assert not res.reverted and res.n_accepted == 3
    assert res.n_tokens == len(ids(tok, res.text)) and res.n_tokens_original == len(ids(tok, TEXT))
    r0 = res.steps[0]
    assert (r0.step, r0.orig_tokens, r0.new_tokens, r0.accepted) == (0, 14, 2, True)
    # cleaned and de-duplicated candidates; the one longer than the original is not scored (NaN)
    assert r0.cand_tokens == [5, 2, 22] and r0.n_dropped == 0
    assert r0.kl[0] >= 0 and r0.kl[1] >= 0 and r0.kl[2] != r0.kl[2]
    assert res.steps[1].cand_tokens == [6, 11] and res.steps[1].new_tokens == 6
    # sampling: original prefixes, K, stop strings, token cap of original length + slack
    assert [c["step"] for c in fake.calls] == [0, 1, 2]
    assert all(c["n"] == 4 and c["stop"] == ["\n\n", "</think>"] for c in fake.calls)
    assert [c["max_new_tokens"] for c in fake.calls] == [14 + 8, 11 + 8, 11 + 8]
    assert len({c["seed"] for c in fake.calls}) == 3


def test_refine_response_epsilon_gates_on_kl(model, tok, monkeypatch):
    install(monkeypatch, default=["a5", "b+6=11", "c-3=8"])
    base = refine_response(model, tok, PROMPT, TEXT, n_candidates=3, window=16, epsilon=0.0)
    assert base.text == TEXT and base.n_accepted == 0  # KL < 0 never holds for a different candidate
    kls = [k for r in base.steps for k in r.kl if k == k]
    assert kls and min(kls) > 0
    cut = sorted(kls)[0] + 1e-9  # admits exactly the lowest-KL candidate
    res = refine_response(model, tok, PROMPT, TEXT, n_candidates=3, window=16, epsilon=cut)
    assert res.n_accepted == 1
    acc = [r for r in res.steps if r.accepted][0]
    assert acc.kl_chosen == pytest.approx(sorted(kls)[0])


def test_refine_response_identical_rewrite_is_not_shorter(model, tok, monkeypatch):
    steps = split_steps(TEXT)[0]
    install(monkeypatch, by_step={i: [step_parts(s)[0]] for i, s in enumerate(steps)})
    res = refine_response(model, tok, PROMPT, TEXT, n_candidates=1, window=8, epsilon=1e9, cap_to_original=False)
    assert res.text == TEXT and res.n_accepted == 0
    assert all(abs(r.kl[0]) < 1e-6 for r in res.steps)  # scored (cap off) and KL 0, but not shorter


def test_refine_response_drops_empty_and_length_limited(model, tok, monkeypatch):
    install(monkeypatch, by_step={0: ["a5", "", "\n\nx", "a"]}, reasons={0: ["length", "stop", "stop", "stop"]})
    res = refine_response(model, tok, PROMPT, TEXT, n_candidates=4, window=8, epsilon=1e9)
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
        res = refine_response(model, tok, PROMPT, text, n_candidates=4, window=6, epsilon=eps, seed=case)
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
    res = refine_response(model, tok, PROMPT, text, n_candidates=2, window=32, epsilon=1e9)
    assert res.text == "s\n\ns\n</think>\n\nAnswer para one.\n\nAnswer para two \\boxed{1}."
    assert len(fake.calls) == 2 and len(res.steps) == 2  # the answer paragraphs are never sampled


def test_steps_are_refined_against_the_original_prefix(model, tok, monkeypatch):
    fake = install(monkeypatch, default=["z"])
    res = refine_response(model, tok, PROMPT, TEXT, n_candidates=1, window=8, epsilon=1e9)
    assert res.text == "z\n\nz\n\nz\n</think>\n\nThe answer is \\boxed{8}."
    steps = split_steps(TEXT)[0]
    assert [c["prompt"] for c in fake.calls] == [PROMPT + "".join(steps[:i]) for i in range(3)]


def test_reverted_response_equals_original(model, tok, monkeypatch):
    install(monkeypatch, default=["z"])
    graded = []
    res = refine_response(model, tok, PROMPT, TEXT, n_candidates=1, window=8, epsilon=1e9,
                          grade_fn=lambda t: graded.append(t) or False)
    assert res.reverted and res.revert_reason == "grade"
    assert res.text == TEXT and res.text.encode() == TEXT.encode()
    assert res.n_tokens == res.n_tokens_original
    assert graded == [res.proposed_text] and res.proposed_text != TEXT
    assert res.n_accepted == 3  # the step decisions are kept in the log
    ok = refine_response(model, tok, PROMPT, TEXT, n_candidates=1, window=8, epsilon=1e9, grade_fn=lambda t: True)
    assert not ok.reverted and ok.text == ok.proposed_text


def test_skipped_steps(model, tok, monkeypatch):
    text = "x\n\nlonger step"  # no </think>: the last step has no continuation
    fake = install(monkeypatch, text=text, default=["y"])
    res = refine_response(model, tok, PROMPT, text, n_candidates=1, window=8, epsilon=1e9)
    assert [r.skipped for r in res.steps] == ["too_short", "no_continuation"]
    assert res.text == text and fake.calls == []


def test_refine_response_bad_arguments(model, tok):
    for kw, msg in ((dict(n_candidates=0), "n_candidates"), (dict(window=0), "window"),
                    (dict(epsilon=-1.0), "epsilon"), (dict(reduction="median"), "reduction"),
                    (dict(max_step_tokens=0), "max_step_tokens"), (dict(batch_size=0), "batch_size")):
        with pytest.raises(ValueError, match=msg):
            refine_response(model, tok, PROMPT, TEXT, **kw)


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
    """A sampler that answers 'z' to every prefix and counts calls (for the pairs tests)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, tokenizer, prompts, n=1, **kw):
        self.calls += 1
        return SimpleNamespace(texts=[["z"] * n], n_tokens=[[1] * n], finish_reasons=[["stop"] * n])


def test_refine_pairs_refines_each_distinct_response_once(model, tok, monkeypatch):
    fake = PrefixSampler()
    monkeypatch.setattr(refinement, "sample", fake)
    pairs = _pairs()
    cfg = RefinementConfig(n_candidates=2, window=8, epsilon=1e9, batch_size=4)
    graded = []
    out, log = refine_pairs(model, tok, pairs, cfg, seed=7, progress=False,
                            grade_fn_factory=lambda row: (lambda t: graded.append(row["problem_id"]) or True))
    assert fake.calls == 3 + 2  # two distinct responses with 3 and 2 steps
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
    monkeypatch.setattr(refinement, "sample", PrefixSampler())
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


def test_refine_pairs_disabled_and_bad_table(model, tok, monkeypatch):
    fake = PrefixSampler()
    monkeypatch.setattr(refinement, "sample", fake)
    out, log = refine_pairs(model, tok, _pairs(), RefinementConfig(enabled=False), seed=0, progress=False)
    assert fake.calls == 0 and not out["refined"].any() and len(log) == 0
    assert refinement_summary(log, out)["acceptance_rate"] is None
    with pytest.raises(ValueError, match="chosen_sample_idx"):
        refine_pairs(model, tok, _pairs().drop(columns=["chosen_sample_idx"]), RefinementConfig(), seed=0)


def test_refine_with_real_sampler(model, tok):
    """Integration with generation.sample: real candidates are drawn and scored, nothing gets longer."""
    from tsq_utils import generation

    assert refinement.sample is generation.sample
    res = refine_response(model, tok, PROMPT, TEXT, n_candidates=3, window=8, epsilon=1e9, max_step_tokens=12,
                          seed=0)
    assert res.n_tokens <= res.n_tokens_original
    assert all(r.n_sampled == 3 for r in res.steps)


def test_toy_world_segment_tokenization_equals_whole_text():
    """In the toy world the segment-wise ids (prompt | bodies | separators | tail) are the whole text's ids,
    so the tokenization caveat of the module does not arise there."""
    from tsq_utils import toyworld
    from tsq_utils.config import ToyWorldConfig

    cfg = ToyWorldConfig()
    toy_tok = toyworld.train_tokenizer(cfg, vocab_size=256, n_docs=300, seed=0)
    rng = random.Random(0)
    for _ in range(100):
        p = toyworld.make_problem(rng, rng.randint(2, 8), cfg.max_value)
        prompt, text = toyworld.prompt_for(p.question, toy_tok), toyworld.teacher_trace(p, rng, cfg)
        steps, tail = split_steps(text)
        segments = [prompt] + [x for s in steps for x in step_parts(s)] + [tail]
        seg_ids = [i for s in segments for i in ids(toy_tok, s)]
        assert seg_ids == ids(toy_tok, prompt + text)
