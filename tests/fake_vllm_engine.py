"""A stand-in for vllm.LLM (tests only): deterministic completions from each request's token ids and seed, plus the
GPUs its process was given, so sharded and unsharded runs can be compared without vLLM."""

import os
from types import SimpleNamespace


class FakeLLM:
    def __init__(self, fail: bool = False, **kwargs):
        if fail:
            raise RuntimeError("no GPU memory left (fake)")
        self.kwargs = kwargs

    def generate(self, inputs, params):
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        outs = []
        for inp, p in zip(inputs, params):
            total = sum(inp["prompt_token_ids"])
            comps = [SimpleNamespace(text=f"{total}:{p['seed'] + j}", index=j, finish_reason="stop", gpus=gpus)
                     for j in reversed(range(p["n"]))]  # vLLM returns samples in completion order
            outs.append(SimpleNamespace(outputs=comps, gpus=gpus))
        return outs
