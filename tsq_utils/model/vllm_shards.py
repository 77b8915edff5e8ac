"""vLLM engines side by side (data parallel): one process per engine on its own GPUs, requests sharded and merged.

generation.sample's vllm backend calls ``engine.generate(inputs, sampling_params)``; ShardedEngines answers the same
call by splitting the requests into contiguous shards, one per engine, and concatenating the answers in request
order. Each request carries its own seed (generation.vllm_requests), so the samples are those one engine would draw.
Notebooks 01 and 05 get one when sampling.data_parallel_size > 1 (base_model.make_vllm_engine).

The engine processes are not daemonic: vllm.LLM starts its own EngineCore process, and Python forbids a daemonic
process to have children ("daemonic processes are not allowed to have children"). So they are stopped explicitly:
close() (base_model.release_sampler), a failed start, the object's garbage collection and the interpreter's exit
all ask each engine to shut down, then terminate and finally kill what is still alive. An engine process also
exits when its pipe to the parent closes (the parent died), and a parent waiting on an engine that died raises
instead of waiting for ever.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.util
import os
import traceback
from types import SimpleNamespace
from typing import Any

import torch

from ..core.parallel import shard_bounds  # noqa: F401 - re-exported: the engines shard requests as stages shard problems


def _plain(outputs) -> list[SimpleNamespace]:
    """vLLM RequestOutputs as picklable records with what generation reads (text, index, finish_reason)."""
    return [SimpleNamespace(outputs=[SimpleNamespace(text=c.text, index=c.index, finish_reason=c.finish_reason)
                                     for c in o.outputs]) for o in outputs]


def _shutdown_engine(engine) -> None:
    """Stop an engine's own processes (vllm.LLM: llm_engine.engine_core.shutdown), where it has any."""
    core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None) or getattr(engine, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # noqa: BLE001 - the process is exiting anyway
            traceback.print_exc()


def _worker(conn, factory: str, engine_kwargs: dict) -> None:
    """One engine's process: build the engine, then answer generate requests until told to close (or the parent's
    end of the pipe closes); the engine's own processes are shut down on the way out."""
    try:
        module, name = factory.split(":")
        engine = getattr(importlib.import_module(module), name)(**engine_kwargs)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
        return
    try:
        conn.send(("ready", os.environ.get("CUDA_VISIBLE_DEVICES")))
        while True:
            try:
                cmd, payload = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            if cmd == "close":
                _shutdown_engine(engine)
                engine = None
                conn.send(("closed", None))
                return
            try:
                conn.send(("ok", _plain(engine.generate(*payload))))
            except BaseException:  # noqa: BLE001
                conn.send(("error", traceback.format_exc()))
    finally:
        if engine is not None:
            _shutdown_engine(engine)


def visible_devices() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _recv(conn, proc, what: str, timeout: float | None = None):
    """The next message from an engine process; RuntimeError if the process died (or timeout passed) first."""
    waited = 0.0
    while not conn.poll(1.0):
        waited += 1.0
        if not proc.is_alive() and not conn.poll(0):
            raise RuntimeError(f"{what}: its process exited (code {proc.exitcode}) without answering")
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"{what}: no answer within {timeout:.0f} s")
    try:
        return conn.recv()
    except (EOFError, OSError) as e:
        proc.join(timeout=5)
        raise RuntimeError(f"{what}: its process exited (code {proc.exitcode}) without answering") from e


def _stop_processes(procs: list, conns: list, reply_timeout: float = 120.0) -> None:
    """Ask every engine process to close, wait for them, then terminate and kill the ones still alive.

    Run by close(), by a failed start, when the ShardedEngines is garbage-collected and at interpreter exit (a
    multiprocessing finalizer with an exit priority runs before multiprocessing joins its non-daemonic children)."""
    asked = []
    for conn, proc in zip(conns, procs):
        if proc.is_alive():
            try:
                conn.send(("close", None))
                asked.append((conn, proc))
            except (OSError, EOFError, ValueError):
                pass
    for conn, proc in asked:
        try:
            _recv(conn, proc, "engine shutdown", timeout=reply_timeout)
        except (RuntimeError, TimeoutError):
            pass
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
    for conn in conns:
        conn.close()
    procs.clear()
    conns.clear()


class ShardedEngines:
    """data_parallel_size vLLM engines, each in its own process on gpus_per_engine GPUs; .generate as vllm.LLM's."""

    def __init__(self, engine_kwargs: dict, data_parallel_size: int, gpus_per_engine: int = 1,
                 factory: str = "vllm:LLM", devices: list[str] | None = None) -> None:
        if data_parallel_size < 1 or gpus_per_engine < 1:
            raise ValueError("data_parallel_size and gpus_per_engine must be >= 1")
        devices = visible_devices() if devices is None else list(devices)
        need = data_parallel_size * gpus_per_engine
        if len(devices) < need:
            raise RuntimeError(f"{data_parallel_size} engines x {gpus_per_engine} GPUs need {need} GPUs, but only "
                               f"{len(devices)} are visible ({devices}); lower sampling.data_parallel_size")
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked; each child sees only its own GPUs
        self._procs, self._conns, self.devices = [], [], []
        self.seen_devices: list[str | None] = []  # CUDA_VISIBLE_DEVICES as each engine's process saw it
        # stops the processes when this object is collected or the interpreter exits without close()
        self._finalizer = multiprocessing.util.Finalize(self, _stop_processes, args=(self._procs, self._conns),
                                                        exitpriority=10)
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            for i in range(data_parallel_size):
                mine = devices[i * gpus_per_engine:(i + 1) * gpus_per_engine]
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)  # a spawned child copies the environment now
                parent, child = ctx.Pipe()
                # not daemonic: vllm.LLM starts an EngineCore process of its own, which a daemonic process may not
                proc = ctx.Process(target=_worker, args=(child, factory, engine_kwargs), daemon=False,
                                   name=f"tsq-vllm-engine-{i}")
                proc.start()
                child.close()  # the child holds its own copy: a dead child now reads as EOF here
                self._procs.append(proc)
                self._conns.append(parent)
                self.devices.append(mine)
            for i, (conn, proc) in enumerate(zip(self._conns, self._procs)):
                status, detail = _recv(conn, proc, f"vLLM engine {i} (GPUs {self.devices[i]})")
                self.seen_devices.append(detail if status == "ready" else None)
                if status != "ready":
                    raise RuntimeError(f"vLLM engine {i} (GPUs {self.devices[i]}) did not start:\n{detail}")
        except BaseException:
            self.close()
            raise
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved

    def __len__(self) -> int:
        return len(self._conns)

    @property
    def pids(self) -> list[int]:
        """The engine processes' ids (for checks and debugging)."""
        return [p.pid for p in self._procs]

    def generate(self, inputs: list, params: list, **_ignored: Any) -> list:
        """Shard the requests over the engines (contiguously), run them at once, and return the outputs in order."""
        if len(inputs) != len(params):
            raise ValueError(f"{len(inputs)} inputs but {len(params)} sampling parameter sets")
        if not self._conns:
            raise RuntimeError("the engines are closed")
        bounds = shard_bounds(len(inputs), len(self._conns))
        for conn, (lo, hi) in zip(self._conns, bounds):
            conn.send(("generate", (inputs[lo:hi], params[lo:hi])))
        merged, errors = [], []
        for i, (conn, proc) in enumerate(zip(self._conns, self._procs)):
            what = f"engine {i} (GPUs {self.devices[i]})"
            try:
                status, payload = _recv(conn, proc, what)
            except RuntimeError as e:
                errors.append(str(e))
                continue
            if status == "ok":
                merged.extend(payload)
            else:
                errors.append(f"{what}:\n{payload}")
        if errors:
            raise RuntimeError("vLLM generation failed on " + "\n".join(errors))
        return merged

    def close(self) -> None:
        """Stop every engine process (and, through each engine's shutdown, the processes it started)."""
        self._finalizer()

    def __enter__(self) -> "ShardedEngines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def llm_engine(self) -> SimpleNamespace:
        """What base_model.release_sampler shuts down (engine_core.shutdown), as for one vllm.LLM."""
        return SimpleNamespace(engine_core=SimpleNamespace(shutdown=self.close))
