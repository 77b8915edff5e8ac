"""vLLM engines side by side (data parallel): one process per engine on its own GPUs, requests sharded and merged.

generation.sample's vllm backend calls ``engine.generate(inputs, sampling_params)``; ShardedEngines answers the same
call by splitting the requests into contiguous shards, one per engine, and concatenating the answers in request
order. Each request carries its own seed (generation.vllm_requests), so the samples are those one engine would draw.
Notebooks 01 and 05 get one when sampling.data_parallel_size > 1 (base_model.make_vllm_engine).
"""

from __future__ import annotations

import importlib
import os
import traceback
from types import SimpleNamespace
from typing import Any


def shard_bounds(n_items: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges splitting n_items into n_shards parts whose sizes differ by at most one."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    base, extra = divmod(n_items, n_shards)
    bounds, lo = [], 0
    for i in range(n_shards):
        hi = lo + base + (i < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _plain(outputs) -> list[SimpleNamespace]:
    """vLLM RequestOutputs as picklable records with what generation reads (text, index, finish_reason)."""
    return [SimpleNamespace(outputs=[SimpleNamespace(text=c.text, index=c.index, finish_reason=c.finish_reason)
                                     for c in o.outputs]) for o in outputs]


def _worker(conn, factory: str, engine_kwargs: dict) -> None:
    """One engine's process: build the engine, then answer generate requests until told to close."""
    try:
        module, name = factory.split(":")
        engine = getattr(importlib.import_module(module), name)(**engine_kwargs)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.environ.get("CUDA_VISIBLE_DEVICES")))
    while True:
        cmd, payload = conn.recv()
        if cmd == "close":
            conn.send(("closed", None))
            return
        try:
            conn.send(("ok", _plain(engine.generate(*payload))))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


def visible_devices() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class ShardedEngines:
    """data_parallel_size vLLM engines, each in its own process on gpus_per_engine GPUs; .generate as vllm.LLM's."""

    def __init__(self, engine_kwargs: dict, data_parallel_size: int, gpus_per_engine: int = 1,
                 factory: str = "vllm:LLM", devices: list[str] | None = None) -> None:
        import multiprocessing

        if data_parallel_size < 1 or gpus_per_engine < 1:
            raise ValueError("data_parallel_size and gpus_per_engine must be >= 1")
        devices = visible_devices() if devices is None else list(devices)
        need = data_parallel_size * gpus_per_engine
        if len(devices) < need:
            raise RuntimeError(f"{data_parallel_size} engines x {gpus_per_engine} GPUs need {need} GPUs, but only "
                               f"{len(devices)} are visible ({devices}); lower sampling.data_parallel_size")
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked; each child sees only its own GPUs
        self._procs, self._conns, self.devices = [], [], []
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            for i in range(data_parallel_size):
                mine = devices[i * gpus_per_engine:(i + 1) * gpus_per_engine]
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)  # a spawned child copies the environment now
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, factory, engine_kwargs), daemon=True)
                proc.start()
                self._procs.append(proc)
                self._conns.append(parent)
                self.devices.append(mine)
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        self.seen_devices: list[str | None] = []  # CUDA_VISIBLE_DEVICES as each engine's process saw it
        for i, conn in enumerate(self._conns):
            status, detail = conn.recv()
            self.seen_devices.append(detail if status == "ready" else None)
            if status != "ready":
                self.close()
                raise RuntimeError(f"vLLM engine {i} (GPUs {self.devices[i]}) did not start:\n{detail}")

    def __len__(self) -> int:
        return len(self._conns)

    def generate(self, inputs: list, params: list, **_ignored: Any) -> list:
        """Shard the requests over the engines (contiguously), run them at once, and return the outputs in order."""
        if len(inputs) != len(params):
            raise ValueError(f"{len(inputs)} inputs but {len(params)} sampling parameter sets")
        bounds = shard_bounds(len(inputs), len(self._conns))
        for conn, (lo, hi) in zip(self._conns, bounds):
            conn.send(("generate", (inputs[lo:hi], params[lo:hi])))
        merged, errors = [], []
        for i, conn in enumerate(self._conns):
            status, payload = conn.recv()
            if status == "ok":
                merged.extend(payload)
            else:
                errors.append(f"engine {i} (GPUs {self.devices[i]}):\n{payload}")
        if errors:
            raise RuntimeError("vLLM generation failed on " + "\n".join(errors))
        return merged

    def close(self) -> None:
        """Stop every engine process."""
        for conn, proc in zip(self._conns, self._procs):
            if proc.is_alive():
                try:
                    conn.send(("close", None))
                    conn.recv()
                except (OSError, EOFError):
                    pass
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
        self._conns, self._procs = [], []

    @property
    def llm_engine(self) -> SimpleNamespace:
        """What base_model.release_sampler shuts down (engine_core.shutdown), as for one vllm.LLM."""
        return SimpleNamespace(engine_core=SimpleNamespace(shutdown=self.close))
