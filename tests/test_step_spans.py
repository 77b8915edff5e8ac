"""Steps as token spans of the whole response's tokenization (tsq_utils.task.step_spans and refinement's "spans")."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

import tsq_utils.method.refinement as refinement
from tsq_utils.core.config import RefinementConfig
from tsq_utils.method.refinement import split_steps, step_parts
from tsq_utils.task.step_spans import step_spans

# Qwen2's pre-tokenizer regex (the R1-Distill-Qwen tokenizer.json): punctuation takes the newlines after it
QWEN_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
            r"|\s+(?!\S)|\s+")
R1_TRACES = ("aime25_DeepSeek-R1-Distill-Qwen-1.5B_aime_25_rollout_temperature0.6.jsonl",
             "aime25_DeepSeek-R1-Distill-Qwen-7B_aime_25_rollout_temperature0.6.jsonl")


def test_step_spans_assigns_tokens_where_they_start():
    # text: "ab.\n\n" | "cd\n\n" | "e" + tail "\n</think>x"; tokens: "ab" ".\n\n" "cd" "\n\n" "e\n" "</think>" "x"
    steps, tail = ["ab.\n\n", "cd\n\n", "e"], "\n</think>x"
    starts = [0, 2, 5, 7, 9, 11, 19]
    sp = step_spans(steps, tail, ["ab.", "cd", "e"], starts)
    assert sp.spans == [(0, 2), (2, 4), (4, 5)] and sp.tail == (5, 7)
    assert sp.aligned == [True, True, True]
    # the last step's token "e\n" crosses into the tail: its suffix carries the newline it swallows
    assert sp.suffixes == ["\n\n", "\n\n", "\n"]
    # a token that starts in one step and runs into the next leaves that step without a clean cut
    sp2 = step_spans(["ab\n\n", "cd\n\n"], "", ["ab", "cd"], [0, 2, 5])  # "\n\nc" is one token
    assert sp2.spans == [(0, 2), (2, 3)] and sp2.aligned == [True, False]
    with pytest.raises(ValueError, match="leading parts"):
        step_spans(["ab\n\n"], "", ["xy"], [0])


class QwenTok:
    """The Qwen2 BPE (tiktoken, merge ranks from the dashscope wheel) behind the slice of the transformers
    tokenizer interface that refinement uses."""

    eos_token_id = 151643

    def __init__(self, enc):
        self.enc = enc

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if isinstance(text, list):
            return {"input_ids": [self.enc.encode(t) for t in text]}
        ids = self.enc.encode(text)
        out = {"input_ids": ids}
        if return_offsets_mapping:
            _, starts = self.enc.decode_with_offsets(ids)
            out["offset_mapping"] = [(a, a) for a in starts]
        return out


@pytest.fixture(scope="module")
def qwen():
    """The real Qwen2 tokenizer, offline (../shared/data/SOURCES.md); skipped when tiktoken or the ranks are absent."""
    tiktoken = pytest.importorskip("tiktoken")
    path = os.environ.get("TSQ_QWEN_TIKTOKEN", "")
    if not path:
        spec = importlib.util.find_spec("dashscope")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("the Qwen merge ranks are absent (pip install dashscope --no-deps, or TSQ_QWEN_TIKTOKEN)")
        path = str(Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken")
    if not Path(path).exists():
        pytest.skip(f"no Qwen merge ranks at {path}")
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    enc = tiktoken.Encoding("qwen2", pat_str=QWEN_PAT, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 151643})
    assert enc.encode("Hello world") == [9707, 1879]  # as the Qwen2.5 tokenizer
    return QwenTok(enc)


def test_spans_are_the_whole_text_tokenization_on_real_r1_traces(qwen, shared_data):
    """On the 60 R1-Distill AIME25 traces: the plan's ids are the whole text's tokenization; each step's ids end
    in its boundary token; a prefix tokenized alone (what the sampler sees) and a step tokenized alone with its
    separator (what a candidate gets) give the very same ids; segment-wise ids (the "segments" mode) do not."""
    n_steps = n_seg_diff = n_boundaries = 0
    for name in R1_TRACES:
        for line in (shared_data / name).read_text().splitlines():
            text = json.loads(line)["completion"]
            whole = qwen.enc.encode(text)
            cfg = RefinementConfig(window=512, max_step_tokens=512)
            plan = refinement.plan_response(qwen, "", text, replace(cfg, steps="spans"))
            assert plan.all_ids() == whole
            seg = refinement.plan_response(qwen, "", text, cfg)
            n_seg_diff += seg.all_ids() != whole
            for rec in plan.records:
                i = rec.step
                if rec.skipped == "boundary_merge":
                    continue
                n_steps += 1
                assert plan.body_ids[i] == qwen.enc.encode(step_parts(plan.steps[i])[0] + plan.cand_suffix[i])
                if i + 1 < len(plan.steps):
                    n_boundaries += 1
                    assert qwen.enc.decode(plan.body_ids[i][-1:]).endswith("\n")  # the boundary token
                    if i < 40:  # prefixes: the first 40 of each trace (all of them would take minutes)
                        assert qwen.enc.encode("".join(plan.steps[:i + 1])) == plan.prefix_ids(i + 1)
    assert n_steps > 5000 and n_boundaries > 5000
    assert n_seg_diff >= 50  # segment-wise tokenization differs from the whole text's on (almost) every trace


def test_spans_mode_refines_on_the_toy_world(monkeypatch, shipped_reasoner):
    """refine_pairs with token-span steps: candidates carry the separator, token counts include the boundary
    token, and with no merges across boundaries (the toy tokenizer) decisions agree with re-thresholding."""
    from tsq_utils.task.toy import prompt_for

    model, tok = shipped_reasoner
    prompt = prompt_for("Q:a5,b+6,c-3", tok)
    text = "a5: start at 5\n\nb+6: 5+6=11\n\nc-3: 11-3=8\n</think>\n\nThe answer is \\boxed{8}."
    n_tok = len(tok(text, add_special_tokens=False)["input_ids"])
    pairs = pd.DataFrame([dict(problem_id="p0", prompt=prompt, chosen=text, chosen_tokens=n_tok, chosen_sample_idx=0)])
    cfg = RefinementConfig(n_candidates=6, window=64, max_step_tokens=32, epsilon=1e9)
    out, log = refinement.refine_pairs(model, tok, pairs, replace(cfg, steps="spans"), seed=1, progress=False)
    _, seg_log = refinement.refine_pairs(model, tok, pairs, cfg, seed=1, progress=False)  # steps "segments"
    body = lambda s: len(tok(step_parts(s)[0], add_special_tokens=False)["input_ids"])  # noqa: E731
    steps = split_steps(text)[0]
    # spans count the separator token ("\n\n" is one toy token) in the step, segments do not
    assert log["orig_tokens"].tolist() == [body(s) + 1 for s in steps[:2]] + [body(steps[2])]
    assert seg_log["orig_tokens"].tolist() == [body(s) for s in steps]
    # same sampler calls, same candidates, except that a span step's length cap is one token longer (it counts the
    # separator): a candidate that runs into the segment's cap is dropped there and may still end within the span's
    for k, (texts, seg_texts) in enumerate(zip(log["cand_texts"], seg_log["cand_texts"])):
        assert [t for t in texts if t in seg_texts] == list(seg_texts)
        tokens = dict(zip(texts, log["cand_tokens"].iloc[k]))
        extra = [tokens[t] for t in texts if t not in seg_texts]
        # any number of them (the old per-batch sampler happened to give at most one here): each is at the cap
        assert all(n >= max(log["cand_tokens"].iloc[k]) for n in extra)
        assert [tokens[t] for t in seg_texts] == [n + (k < 2) for n in seg_log["cand_tokens"].iloc[k]]
    assert out["chosen_tokens"].iloc[0] <= out["chosen_tokens_original"].iloc[0]
    again = refinement.rethreshold(tok, pairs, log, replace(cfg, steps="spans"))
    pd.testing.assert_frame_equal(again[0], out)
