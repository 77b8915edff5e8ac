"""A stand-in for vllm.LLM (tests only): deterministic completions from each request's token ids and seed, plus the
GPUs its process was given, so sharded and unsharded runs can be compared without vLLM.

Like vllm.LLM, which starts an EngineCore process of its own, the fake answers generate() from a child process it
starts itself: an engine process that is daemonic cannot start it ("daemonic processes are not allowed to have
children"), which is what tsq_utils.model.vllm_shards must avoid. llm_engine.engine_core.shutdown() stops the
child, as vLLM's does. With pid_dir, each engine writes "<its pid> <its child's pid>" to a file there, so a test can
check that every process was stopped."""

import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace


def _answer(inputs, params, gpus):
    outs = []
    for inp, p in zip(inputs, params):
        total = sum(inp["prompt_token_ids"])
        comps = [SimpleNamespace(text=f"{total}:{p['seed'] + j}", index=j, finish_reason="stop", gpus=gpus)
                 for j in reversed(range(p["n"]))]  # vLLM returns samples in completion order
        outs.append(SimpleNamespace(outputs=comps, gpus=gpus))
    return outs


def _core(conn, parent_end):
    """The fake EngineCore: answers (inputs, params) until None or until its parent's end of the pipe closes (its
    parent died: vLLM's EngineCore watches its parent too)."""
    parent_end.close()  # the forked copy of the parent's end, or a dead parent would never read as EOF here
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        conn.send(_answer(*msg))


class FakeLLM:
    def __init__(self, fail: bool = False, pid_dir: str = "", fail_generate: bool = False, **kwargs):
        self.kwargs = kwargs
        self.fail_generate = fail_generate
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        # raises AssertionError in a daemonic process, as vllm.LLM's EngineCore start does
        self._core = ctx.Process(target=_core, args=(child, self._conn), daemon=True, name="FakeEngineCore")
        self._core.start()
        child.close()
        if pid_dir:
            Path(pid_dir, f"engine-{os.getpid()}.pid").write_text(f"{os.getpid()} {self._core.pid}")
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self.shutdown))
        if fail:
            self.shutdown()
            raise RuntimeError("no GPU memory left (fake)")

    def generate(self, inputs, params):
        if self.fail_generate:
            raise RuntimeError("engine error (fake)")
        self._conn.send((list(inputs), list(params), os.environ.get("CUDA_VISIBLE_DEVICES")))
        return self._conn.recv()

    def shutdown(self):
        if self._core.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._core.join(timeout=10)
            if self._core.is_alive():
                self._core.terminate()
                self._core.join()
        self._conn.close()
