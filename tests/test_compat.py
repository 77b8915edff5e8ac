"""tsq_utils.model.compat: the same numbers through the new and the old transformers spellings (KV cache,
2-D logits_to_keep, activation checkpointing), whichever transformers this venv has."""

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_toy_model
from transformers import TrainingArguments

from tsq_utils.model import compat


@pytest.fixture(scope="module")
def model(tiny_toy_tokenizer):
    m = tiny_toy_model(tiny_toy_tokenizer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def _ids(n_rows=3, width=9, vocab=100):
    return torch.randint(3, vocab, (n_rows, width), generator=torch.Generator().manual_seed(0))


def test_cache_kwarg_is_the_one_forward_takes(model):
    name = compat.cache_kwarg(model)
    assert name in ("cache", "past_key_values")
    assert name in inspect.signature(type(model).forward).parameters


def test_output_cache_reads_either_name():
    assert compat.output_cache(SimpleNamespace(cache="new")) == "new"
    assert compat.output_cache(SimpleNamespace(past_key_values="old")) == "old"
    assert compat.output_cache(SimpleNamespace(logits=None)) is None


@torch.no_grad()
def test_decoding_with_the_cache_equals_one_full_forward(model):
    ids = _ids()
    full = model(input_ids=ids).logits
    out = model(input_ids=ids[:, :-1], use_cache=True)
    cache = compat.output_cache(out)
    assert cache is not None
    step = compat.forward_with_cache(model, cache, input_ids=ids[:, -1:], use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    assert compat.forward_with_cache(model, None, input_ids=ids).logits.shape == full.shape


@pytest.mark.parametrize("native", [True, False])
@torch.no_grad()
def test_forward_logits_at_gathers_per_row_positions(model, monkeypatch, native):
    if not native:  # the pre-hook fallback of older transformers, exercised on any version
        monkeypatch.setattr(compat, "supports_2d_logits_to_keep", lambda m: False)
    elif not compat.supports_2d_logits_to_keep(model):
        pytest.skip("this transformers has no 2-D logits_to_keep")
    ids = _ids(width=12)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7], [9, 10, 11]])
    full = model(input_ids=ids).logits
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, _i, o: seen.append(tuple(o.shape)))
    try:
        got = compat.forward_logits_at(model, pos, input_ids=ids).logits
    finally:
        handle.remove()
    assert seen == [(3, 3, full.shape[-1])]  # the LM head never sees the other positions
    torch.testing.assert_close(got, torch.take_along_dim(full, pos[..., None], dim=1), rtol=1e-5, atol=1e-5)


def test_forward_logits_at_rejects_masks_and_its_own_keyword(model):
    with pytest.raises(ValueError, match="integer tensor"):
        compat.forward_logits_at(model, torch.ones(2, 3, dtype=torch.bool), input_ids=_ids(2))
    with pytest.raises(ValueError, match="logits_to_keep"):
        compat.forward_logits_at(model, torch.zeros(2, 1, dtype=torch.long), input_ids=_ids(2), logits_to_keep=1)


def test_checkpointing_kwargs_uses_the_field_this_version_has():
    (name, value), = compat.checkpointing_kwargs(True).items()
    assert value is True and name in {f.name for f in dataclasses.fields(TrainingArguments)}

    @dataclasses.dataclass
    class OldArgs:
        gradient_checkpointing: bool = False

    assert compat.checkpointing_kwargs(False, OldArgs) == {"gradient_checkpointing": False}


def test_unwrap_sees_through_wrappers(model):
    assert compat.unwrap(SimpleNamespace(module=SimpleNamespace(_orig_mod=model))) is model
    assert compat.unwrap(model) is model
