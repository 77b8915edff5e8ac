"""Data-parallel vLLM engines (tsq_utils.model.vllm_shards) with a fake engine: the same samples as one engine, each
engine on its own GPUs, failures reported. The fake engine, like vllm.LLM, starts a child process of its own, which
a daemonic engine process may not; every process is stopped on close, on a failed start and at interpreter exit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tsq_utils.model.generation import Decoding, sample, vllm_requests
from tsq_utils.model.vllm_shards import ShardedEngines, shard_bounds

FAKE = "fake_vllm_engine:FakeLLM"
TESTS = Path(__file__).resolve().parent


def _gone(pid: int) -> bool:
    """Whether a process has exited (a zombie awaiting its reaper counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in status


def _engine_pids(pid_dir: Path) -> list[int]:
    """Every process the fake engines wrote down: each engine's own process and its EngineCore child."""
    return [int(x) for f in sorted(pid_dir.glob("engine-*.pid")) for x in f.read_text().split()]


def _all_gone(pids: list[int], wait: float = 15.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("n, k", [(10, 3), (3, 3), (2, 4), (0, 2), (7, 1)])
def test_shard_bounds_cover_everything_in_order(n, k):
    b = shard_bounds(n, k)
    assert len(b) == k and b[0][0] == 0 and b[-1][1] == n
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(b, b[1:]))
    sizes = [hi - lo for lo, hi in b]
    assert max(sizes) - min(sizes) <= 1


def test_sharded_engines_give_the_samples_of_one_engine(tiny_toy_tokenizer, monkeypatch, tmp_path):
    import types

    from fake_vllm_engine import FakeLLM

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=dict))  # requests as plain dicts

    tok = tiny_toy_tokenizer
    prompts = [f"Q:{i}+{i}\n" for i in range(7)]
    single = FakeLLM()
    try:
        one = sample(single, tok, prompts, Decoding(n=3, temperature=1.0, seed=5), backend="vllm")
    finally:
        single.shutdown()
    # each fake engine starts a child process, as vllm.LLM does: the engine processes must not be daemonic
    engines = ShardedEngines({"pid_dir": str(tmp_path)}, data_parallel_size=3, factory=FAKE,
                             devices=["0", "1", "2", "3"])
    try:
        assert engines.devices == [["0"], ["1"], ["2"]] and engines.seen_devices == ["0", "1", "2"]
        many = sample(engines, tok, prompts, Decoding(n=3, temperature=1.0, seed=5), backend="vllm")
        inputs, params = vllm_requests(tok, prompts[:3], Decoding(1, 1.0, 1.0, 8, 0))
        outs = engines.generate(inputs, params)
        assert len(outs) == 3
        pids = _engine_pids(tmp_path)
        assert len(pids) == 6 and not any(_gone(p) for p in pids)  # 3 engines, each with its own child
        assert sorted(engines.pids) == sorted(pids[0::2])
    finally:
        engines.llm_engine.engine_core.shutdown()  # what base_model.release_sampler calls
    assert many.texts == one.texts and many.finish_reasons == one.finish_reasons
    assert len(engines) == 0
    assert _all_gone(pids), "engine processes or their children outlived close()"
    engines.close()  # a second close is a no-op
    with pytest.raises(RuntimeError, match="closed"):
        engines.generate([], [])


def test_engines_need_enough_gpus_and_report_a_failed_start(tmp_path):
    with pytest.raises(RuntimeError, match="need 4 GPUs, but only 2"):
        ShardedEngines({}, data_parallel_size=2, gpus_per_engine=2, factory=FAKE, devices=["0", "1"])
    with pytest.raises(RuntimeError, match="(?s)did not start:.*no GPU memory left"):
        ShardedEngines({"fail": True, "pid_dir": str(tmp_path)}, data_parallel_size=2, factory=FAKE,
                       devices=["0", "1"])
    pids = _engine_pids(tmp_path)
    assert len(pids) == 4 and _all_gone(pids), "a failed start left engine processes behind"


def test_a_generate_error_and_a_dead_engine_raise_instead_of_hanging(tmp_path):
    engines = ShardedEngines({"fail_generate": True, "pid_dir": str(tmp_path)}, data_parallel_size=2, factory=FAKE,
                             devices=["0", "1"])
    try:
        with pytest.raises(RuntimeError, match="(?s)generation failed on engine 0.*engine error"):
            engines.generate([{"prompt_token_ids": [1]}] * 2, [{"n": 1, "seed": 0}] * 2)
        os.kill(engines.pids[1], signal.SIGKILL)
        with pytest.raises(RuntimeError, match="engine 1 .*exited"):
            engines.generate([{"prompt_token_ids": [1]}] * 2, [{"n": 1, "seed": 0}] * 2)
    finally:
        engines.close()
    assert _all_gone(_engine_pids(tmp_path))


def test_engines_left_open_are_stopped_at_interpreter_exit(tmp_path):
    """A script that never closes its engines still exits (multiprocessing would otherwise wait for ever on the
    non-daemonic engine processes), and takes every engine process and engine child with it."""
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
              "from tsq_utils.model.vllm_shards import ShardedEngines\n"
              f"e = ShardedEngines({{'pid_dir': {str(tmp_path)!r}}}, 2, factory={FAKE!r}, devices=['0', '1'])\n"
              "print('started', e.pids, flush=True)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "started" in r.stdout, r.stdout + r.stderr
    pids = _engine_pids(tmp_path)
    assert len(pids) == 4 and _all_gone(pids), "engine processes outlived the interpreter"
