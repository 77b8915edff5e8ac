"""Shared test set-up: one torch thread (a busy 2-core box runs far slower with two)."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The ../shared/data folder; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A fake repository root holding runs/ and figures/ under tmp_path, so paths print repo-relative."""
    from tsq_utils.core import config

    monkeypatch.setattr(config, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("TSQ_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("TSQ_FIGURES_DIR", str(tmp_path / "figures"))
    return tmp_path


TINY_MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="session")
def tiny_toy_tokenizer():
    """A tiny toy-world tokenizer (300 teacher documents, vocab at most 128), shared by the tests that sample."""
    from tsq_utils.core.config import ToyWorldConfig
    from tsq_utils.model.toy_reasoner import train_tokenizer

    return train_tokenizer(ToyWorldConfig(), vocab_size=128, n_docs=300, seed=0)


@pytest.fixture(scope="session")
def shipped_reasoner():
    """The shipped toy reasoner (eval mode; tests only read it) and its tokenizer; skips when it is absent."""
    from tsq_utils.model import toy_reasoner

    path = REPO / "checkpoints" / "toy-reasoner"
    if not (path / "model.safetensors").exists():
        pytest.skip("the shipped toy reasoner is absent")
    model, tok = toy_reasoner.load_reasoner(path)
    return model.eval(), tok


@pytest.fixture(scope="module")
def tok(tiny_toy_tokenizer):
    """The shared tiny toy tokenizer, under the name the sampling tests use."""
    return tiny_toy_tokenizer


@pytest.fixture(scope="module")
def model(tok):
    """A fresh tiny toy reasoner per test module (a module overrides it where it needs other weights)."""
    return tiny_toy_model(tok)


def tiny_toy_model(tokenizer):
    """A freshly initialised one-layer toy reasoner (hidden 32) for the given tokenizer."""
    from tsq_utils.core.config import PretrainConfig
    from tsq_utils.model.toy_reasoner import new_model

    return new_model(tokenizer, PretrainConfig(**TINY_MODEL), seed=0)
