"""Data-parallel vLLM engines (tsq_utils.model.vllm_shards) with a fake engine: the same samples as one engine, each
engine on its own GPUs, failures reported."""

import pytest

from tsq_utils.model.generation import sample, vllm_requests
from tsq_utils.model.vllm_shards import ShardedEngines, shard_bounds

FAKE = "fake_vllm_engine:FakeLLM"


@pytest.mark.parametrize("n, k", [(10, 3), (3, 3), (2, 4), (0, 2), (7, 1)])
def test_shard_bounds_cover_everything_in_order(n, k):
    b = shard_bounds(n, k)
    assert len(b) == k and b[0][0] == 0 and b[-1][1] == n
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(b, b[1:]))
    sizes = [hi - lo for lo, hi in b]
    assert max(sizes) - min(sizes) <= 1


def test_sharded_engines_give_the_samples_of_one_engine(tiny_toy_tokenizer, monkeypatch):
    import sys
    import types

    from fake_vllm_engine import FakeLLM

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=dict))  # requests as plain dicts

    tok = tiny_toy_tokenizer
    prompts = [f"Q:{i}+{i}\n" for i in range(7)]
    one = sample(FakeLLM(), tok, prompts, n=3, temperature=1.0, seed=5, backend="vllm")
    engines = ShardedEngines({}, data_parallel_size=3, factory=FAKE, devices=["0", "1", "2", "3"])
    try:
        assert engines.devices == [["0"], ["1"], ["2"]] and engines.seen_devices == ["0", "1", "2"]
        many = sample(engines, tok, prompts, n=3, temperature=1.0, seed=5, backend="vllm")
        inputs, params = vllm_requests(tok, prompts[:3], 1, 1.0, 1.0, 8, 0)
        outs = engines.generate(inputs, params)
        assert len(outs) == 3
    finally:
        engines.llm_engine.engine_core.shutdown()  # what base_model.release_sampler calls
    assert many.texts == one.texts and many.finish_reasons == one.finish_reasons
    assert len(engines) == 0


def test_engines_need_enough_gpus_and_report_a_failed_start():
    with pytest.raises(RuntimeError, match="need 4 GPUs, but only 2"):
        ShardedEngines({}, data_parallel_size=2, gpus_per_engine=2, factory=FAKE, devices=["0", "1"])
    with pytest.raises(RuntimeError, match="(?s)did not start:.*no GPU memory left"):
        ShardedEngines({"fail": True}, data_parallel_size=2, factory=FAKE, devices=["0", "1"])
