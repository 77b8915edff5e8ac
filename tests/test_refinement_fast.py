"""Scoring that never recomputes (refinement's "full" and "fast" modes, the "branch" candidates): the accept
decisions and KLs equal the reference path's, on the toy world."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pandas as pd
import pytest
import torch

import tsq_utils.method.refinement as refinement
from tsq_utils.model import compat
from tsq_utils.core.config import RefinementConfig
from tsq_utils.method.refinement import RefineOptions
from tsq_utils.model import generation

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "checkpoints" / "toy-reasoner"


@pytest.fixture(scope="module")
def toy(shipped_reasoner):
    """The shipped toy reasoner, its tokenizer and a pairs table of 6 toy teacher traces (k = 3..8)."""
    from tsq_utils.task import toy
    from tsq_utils.core.config import ToyWorldConfig

    model, tok = shipped_reasoner
    cfg, rng = ToyWorldConfig(), random.Random(3)
    rows = []
    for n in range(6):
        p = toy.make_problem(rng, 3 + n, cfg.max_value)
        text = toy.teacher_trace(p, rng, cfg)
        rows.append(dict(problem_id=f"p{n}", prompt=toy.prompt_for(p.question, tok), chosen=text,
                         chosen_tokens=len(tok(text, add_special_tokens=False)["input_ids"]), chosen_sample_idx=0))
    return model, tok, pd.DataFrame(rows)


class Memo:
    """The real sampler, each distinct call drawn once: every mode scores the very same candidates."""

    def __init__(self):
        self.cache = {}

    def __call__(self, model, tokenizer, prompts, spec, progress=False):
        key = (tuple(prompts), spec)
        if key not in self.cache:
            self.cache[key] = generation.sample(model, tokenizer, prompts, spec)
        return self.cache[key]


@pytest.fixture
def memo_sampler(monkeypatch):
    memo = Memo()
    monkeypatch.setattr(refinement.sources, "sample", memo)
    return memo


def test_fast_and_full_scoring_keep_the_reference_decisions(toy, memo_sampler):
    """At eps 0.001, 0.005 and 0.05 the three scoring modes accept the same candidates and produce the same refined
    texts; "full" KLs equal the reference's (to float rounding), "fast" ones are equal where exact, lower bounds
    where flagged, NaN where a shorter length already passed."""
    model, tok, pairs = toy
    base = RefinementConfig(n_candidates=8, window=512, max_step_tokens=64, batch_size=16)
    seen_accept, seen_bound, seen_skip = set(), 0, 0
    for eps in (0.001, 0.005, 0.05):
        cfg = RefinementConfig(**{**base.__dict__, "epsilon": eps})
        out = {m: refinement.refine_pairs(model, tok, pairs, dataclasses.replace(cfg, scoring=m), seed=11,
                                          progress=False, options=RefineOptions(sample_batch_size=32))
               for m in ("reference", "full", "fast")}
        ref_pairs, ref_log = out["reference"]
        for m in ("full", "fast"):
            got_pairs, got_log = out[m]
            assert got_log["accepted"].tolist() == ref_log["accepted"].tolist(), (m, eps)
            assert got_log["new_tokens"].tolist() == ref_log["new_tokens"].tolist(), (m, eps)
            pd.testing.assert_frame_equal(got_pairs, ref_pairs)
        for rk, fk, qk, qb, ok in zip(ref_log["kl"], out["full"][1]["kl"], out["fast"][1]["kl"],
                                      out["fast"][1]["kl_bound"], ref_log["orig_tokens"]):
            for a, b, c, bound in zip(rk, fk, qk, qb):
                if math.isnan(a):
                    assert math.isnan(b) and math.isnan(c)
                    continue
                assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
                if bound:
                    assert c <= a * (1 + 1e-4) + 1e-6 and c > eps  # a lower bound that already fails
                    seen_bound += 1
                elif math.isnan(c):
                    seen_skip += 1  # a shorter candidate passed first
                else:
                    assert c == pytest.approx(a, rel=1e-4, abs=1e-6)
        assert not out["full"][1]["kl_bound"].map(any).any()
        assert refinement.fully_scored(out["full"][1]) and refinement.fully_scored(ref_log)
        seen_accept.add(int(ref_log["accepted"].sum()))
    # not vacuous: the thresholds accept different numbers of steps, and both shortcuts of "fast" were taken
    assert len(seen_accept) >= 2 and max(seen_accept) > 0
    assert seen_bound > 0 and seen_skip > 0


def test_rethreshold_refuses_a_fast_log(toy, memo_sampler):
    model, tok, pairs = toy
    cfg = RefinementConfig(n_candidates=8, window=512, max_step_tokens=64, epsilon=0.05, batch_size=16)
    _, fast_log = refinement.refine_pairs(model, tok, pairs.iloc[:3], dataclasses.replace(cfg, scoring="fast"),
                                          seed=11, progress=False)
    assert not refinement.fully_scored(fast_log)
    with pytest.raises(ValueError, match="scoring='full'"):
        refinement.rethreshold(tok, pairs.iloc[:3], fast_log, cfg)
    # a log from before the kl_bound column (all exact) is still accepted
    _, full_log = refinement.refine_pairs(model, tok, pairs.iloc[:3], cfg, seed=11, progress=False)  # "full"
    a = refinement.rethreshold(tok, pairs.iloc[:3], full_log.drop(columns="kl_bound"), cfg)
    b = refinement.rethreshold(tok, pairs.iloc[:3], full_log, cfg)
    pd.testing.assert_frame_equal(a[0], b[0])


def test_branch_candidates_do_not_depend_on_the_company(toy):
    """Candidates decoded from a response's own cache: the same for the response alone or among others, valid
    steps (no blank line, within the cap), and the run is exact under "fast" scoring too."""
    model, tok, pairs = toy
    cfg = RefinementConfig(n_candidates=6, window=512, max_step_tokens=64, epsilon=0.05, batch_size=16,
                           candidates="branch")
    _, alone = refinement.refine_pairs(model, tok, pairs.iloc[[2]], cfg, seed=5, progress=False)
    pairs = pairs.iloc[:4]
    _, among = refinement.refine_pairs(model, tok, pairs, cfg, seed=5, progress=False)
    mine = among[among["response_id"] == alone["response_id"].iloc[0]].reset_index(drop=True)
    assert mine["cand_texts"].tolist() == alone["cand_texts"].tolist()
    cands = [c for cs in among["cand_texts"] for c in cs]
    assert len(cands) > 20 and all(c and "\n\n" not in c and "</think>" not in c for c in cands)
    assert (among["n_sampled"][among["skipped"] == ""] == 6).all()
    _, fast = refinement.refine_pairs(model, tok, pairs, dataclasses.replace(cfg, scoring="fast"), seed=5,
                                      progress=False)
    assert fast["accepted"].tolist() == among["accepted"].tolist()
    assert fast["cand_texts"].tolist() == among["cand_texts"].tolist()


def test_branch_cache_leaves_the_source_intact(toy):
    model, tok, _ = toy
    ids = tok("Q:a5,b+6,c-3 a5: 5", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        fwd = refinement.scoring._ResponseForward(model, ids, torch.device("cpu"))
        before = [layer.keys.clone() for layer in fwd.cache.layers]
        c = fwd.branch(len(ids) - 2, 3)
        out = compat.forward_with_cache(model, c, input_ids=torch.tensor([[ids[-2]]] * 3),
                                        position_ids=torch.tensor([[len(ids) - 2]] * 3), use_cache=True)
        full = model(input_ids=torch.tensor([ids[:-1]])).logits[0, -1]
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, fwd.cache.layers))
    assert torch.allclose(out.logits[0, -1], full, atol=1e-4)


def test_interrupted_refinement_resumes_from_its_shards(toy, tmp_path, monkeypatch):
    """Groups are written as they finish; a rerun after an interruption redoes only the missing ones and gives the
    uninterrupted run's tables; two shard processes and a final assembly give them too."""
    model, tok, pairs = toy
    pairs = pairs.iloc[:4]
    cfg = RefinementConfig(n_candidates=4, window=64, max_step_tokens=48, epsilon=0.05, batch_size=16,
                           scoring="fast")
    monkeypatch.setattr(refinement.shards, "MAX_STEPS_PER_CALL", 6)  # several groups of responses
    kw = dict(seed=2, progress=False)
    want = refinement.refine_pairs(model, tok, pairs, cfg, **kw)

    real, calls = refinement.sources._draw_candidates, []

    def dies_on_third_group(model, tokenizer, plans, *a, **k):
        calls.append([p.response_id for p in plans])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, tokenizer, plans, *a, **k)

    monkeypatch.setattr(refinement.sources, "_draw_candidates", dies_on_third_group)
    with pytest.raises(KeyboardInterrupt):
        refinement.refine_pairs(model, tok, pairs, cfg, options=RefineOptions(shard_dir=tmp_path / "s"), **kw)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["group-00000.json", "group-00001.json"]
    calls.clear()
    monkeypatch.setattr(refinement.sources, "_draw_candidates", lambda *a, **k: (calls.append(a[2]), real(*a, **k)))
    got = refinement.refine_pairs(model, tok, pairs, cfg, options=RefineOptions(shard_dir=tmp_path / "s"), **kw)
    n_groups = len(list((tmp_path / "s").iterdir()))
    assert n_groups >= 3 and len(calls) == n_groups - 2  # the two finished groups were not redone
    pd.testing.assert_frame_equal(got[0], want[0])
    pd.testing.assert_frame_equal(got[1], want[1])
    # one process per GPU: each computes its share, then the assembly reads them all
    assert refinement.refine_pairs(model, tok, pairs, cfg,
                                   options=RefineOptions(shard_dir=tmp_path / "p", shard=(0, 2)), **kw) is None
    assert refinement.refine_pairs(model, tok, pairs, cfg,
                                   options=RefineOptions(shard_dir=tmp_path / "p", shard=(1, 2)), **kw) is not None
    calls.clear()
    both = refinement.refine_pairs(model, tok, pairs, cfg, options=RefineOptions(shard_dir=tmp_path / "p"), **kw)
    assert calls == []
    pd.testing.assert_frame_equal(both[1], want[1])
    # a shard folder of another run is never mixed in: its groups are redone and replaced
    n_p = len(list((tmp_path / "p").iterdir()))
    with pytest.raises(refinement.StaleShardError, match="another refinement run"):
        refinement.shards._load_group(tmp_path / "p" / "group-00000.json", "not-this-run")
    calls.clear()
    other = dataclasses.replace(cfg, epsilon=0.01)
    refinement.refine_pairs(model, tok, pairs, other, options=RefineOptions(shard_dir=tmp_path / "p"), **kw)
    assert len(calls) == n_p
    calls.clear()
    refinement.refine_pairs(model, tok, pairs, other, options=RefineOptions(shard_dir=tmp_path / "p"), **kw)
    assert calls == []  # the replaced groups now belong to this run


def test_vllm_candidates_one_request_per_step(toy, monkeypatch):
    """candidates='vllm': one request of n = K per step, as token ids (prefixes of one sequence, for prefix
    caching), stopping at a blank line or '</think>', max_tokens at the step's cap, a seed per (response, step);
    vLLM's texts are scored like the sampler's (here: the samples the transformers sampler draws)."""
    import sys
    import types

    model, tok, pairs = toy
    pairs = pairs.iloc[:2]

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class FakeLLM:
        def __init__(self):
            self.requests = []

        def generate(self, prompts, params, use_tqdm=True):
            self.requests += list(zip(prompts, params))
            outs = []
            for p, sp in zip(prompts, params):
                text = tok.decode(p["prompt_token_ids"])
                res = generation.sample(model, tok, [text], generation.Decoding(
                    n=sp.kw["n"], max_new_tokens=sp.kw["max_tokens"], seed=sp.kw["seed"], stop=sp.kw["stop"]))
                comps = [types.SimpleNamespace(index=j, text=t, finish_reason="stop" if r == "stop" else "length")
                         for j, (t, r) in enumerate(zip(res.texts[0], res.finish_reasons[0]))]
                outs.append(types.SimpleNamespace(outputs=comps[::-1]))  # completion order is not sample order
            return outs

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams))
    cfg = RefinementConfig(n_candidates=5, window=512, max_step_tokens=64, epsilon=0.05, batch_size=16,
                           candidates="vllm")
    with pytest.raises(ValueError, match="needs a vLLM engine"):
        refinement.refine_pairs(model, tok, pairs, cfg, seed=4, progress=False)
    llm = FakeLLM()
    out, log = refinement.refine_pairs(model, tok, pairs, dataclasses.replace(cfg, steps="spans"), seed=4,
                                       progress=False, options=RefineOptions(llm=llm))
    sampled = log[log["skipped"] == ""]
    assert len(llm.requests) == len(sampled) > 5
    prompts = [p["prompt_token_ids"] for p, _ in llm.requests]
    for (p, sp), (_, row) in zip(llm.requests, sampled.iterrows()):
        assert sp.kw["n"] == 5 and sp.kw["stop"] == ["\n\n", "</think>"]
        assert sp.kw["max_tokens"] == min(64, row["orig_tokens"] + refinement.STOP_SLACK_TOKENS)
    # the step prefixes of one response are prefixes of one another (what automatic prefix caching shares)
    first = [p for p in prompts if p[:20] == prompts[0][:20]]
    assert all(a == b[:len(a)] for a, b in zip(first, first[1:]))
    assert len({sp.kw["seed"] for _, sp in llm.requests}) == len(llm.requests)
    assert (sampled["n_sampled"] == 5).all() and sum(len(c) for c in sampled["cand_texts"]) > 10
    assert out["chosen_tokens"].le(out["chosen_tokens_original"]).all()
