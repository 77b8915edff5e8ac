"""Every core, deterministically (core/parallel.py): fixed shards, any number of one-thread processes, the same bytes.

The stages' own tests: sampling + grading, evaluation and refinement give identical tables with 1 and 2 workers.
"""

import os

import pandas as pd
import pytest
import torch

from tsq_utils.core import parallel
from tsq_utils.core.config import RefinementConfig
from tsq_utils.method import evaluation, refinement
from tsq_utils.method.sampling import SampleRun, sample_and_grade
from tsq_utils.model.generation import Decoding
from tsq_utils.task.registry import get_task
from tsq_utils.task import toy as tw


def _task(shared, t):
    return t, shared["x"] * t, torch.get_num_threads(), os.getpid()


def _boom(shared, t):
    if t == 2:
        raise ValueError(f"shard {t} failed")
    return t


def test_map_shards_keeps_order_inherits_shared_and_uses_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = parallel.map_shards(_task, range(6), workers=2, shared={"x": 3})
        inline = parallel.map_shards(_task, range(6), workers=1, shared={"x": 3})
    finally:
        torch.set_num_threads(before)
    assert [o[:3] for o in out] == [(t, 3 * t, 1) for t in range(6)] == [o[:3] for o in inline]
    assert os.getpid() not in {o[3] for o in out}  # two processes of their own did the work
    assert {o[3] for o in inline} == {os.getpid()}


def test_map_shards_raises_a_shards_error_and_runs_inline_with_more_threads():
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="shard 2 failed"):
        parallel.map_shards(_boom, range(4), workers=2)
    torch.set_num_threads(2)  # a parent with a thread pool is not forked: the shards run here, one thread each
    try:
        out = parallel.map_shards(_task, range(3), workers=2, shared={"x": 1})
        assert {o[3] for o in out} == {os.getpid()} and {o[2] for o in out} == {1}
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, None])
def test_n_workers_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        parallel.n_workers(bad)


def test_n_workers_zero_is_every_available_core():
    assert parallel.n_workers(0) == parallel.available_cores() >= 1
    assert parallel.n_workers(3) == 3


def test_shard_bounds_closed_form():
    assert parallel.shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert parallel.shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError):
        parallel.shard_bounds(3, 0)


@pytest.fixture(scope="module")
def problems(tok):
    return tw.problem_table(tw.make_problems(7, seed=3, k_min=2, k_max=4), tok)


def test_sampling_is_the_same_with_one_and_two_workers(model, tok, problems):
    """The profile fixes the shards; the machine's worker count changes no byte of the samples table."""
    torch.set_num_threads(1)
    spec = Decoding(n=3, temperature=1.3, top_p=1.0, max_new_tokens=24, seed=5, batch_size=4)
    one = sample_and_grade(model, tok, problems, get_task("toy"), spec, SampleRun(shards=3, workers=1, progress=False))
    two = sample_and_grade(model, tok, problems, get_task("toy"), spec, SampleRun(shards=3, workers=2, progress=False))
    pd.testing.assert_frame_equal(one, two)
    assert len(one) == 21 and one["text"].str.len().gt(0).any()


def test_evaluation_is_the_same_with_one_and_two_workers(model, tok, problems):
    torch.set_num_threads(1)
    spec = Decoding(n=2, temperature=0.6, top_p=1.0, max_new_tokens=16, seed=9, batch_size=8)
    one = evaluation.evaluate_model("m", model, tok, {"toy": problems}, spec, SampleRun(shards=2, workers=1,
                                                                                        progress=False))
    two = evaluation.evaluate_model("m", model, tok, {"toy": problems}, spec, SampleRun(shards=2, workers=2,
                                                                                        progress=False))
    pd.testing.assert_frame_equal(one, two)


def test_refinement_is_the_same_with_one_and_two_workers(model, tok):
    """Groups of responses are the unit: each group's candidates and KLs are the same in any process."""
    import random

    from tsq_utils.core.config import ToyWorldConfig

    torch.set_num_threads(1)
    probs = tw.make_problems(4, seed=1, k_min=2, k_max=3)
    table = tw.problem_table(probs, tok)
    texts = [tw.teacher_trace(p, random.Random(i), ToyWorldConfig()) for i, p in enumerate(probs)]
    pairs = pd.DataFrame({
        "problem_id": table["problem_id"], "k": table["k"], "prompt": table["prompt"], "chosen": texts,
        "rejected": ["r"] * 4, "chosen_tokens": [len(tok(t)["input_ids"]) for t in texts], "rejected_tokens": [1] * 4,
        "p": [0.5] * 4, "chosen_sample_idx": [0] * 4, "rejected_sample_idx": [1] * 4, "kind": ["pair"] * 4,
    })
    cfg = RefinementConfig(n_candidates=2, window=8, epsilon=1e9, batch_size=4, max_step_tokens=12)
    one = refinement.refine_pairs(model, tok, pairs, cfg, seed=3, progress=False,
                                  options=refinement.RefineOptions(shards=3, workers=1))
    two = refinement.refine_pairs(model, tok, pairs, cfg, seed=3, progress=False,
                                  options=refinement.RefineOptions(shards=3, workers=2))
    assert len(one[1]) > 0  # steps were scored
    for a, b in zip(one, two):
        pd.testing.assert_frame_equal(a, b)
