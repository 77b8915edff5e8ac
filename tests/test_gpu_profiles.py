"""The GPU profiles (r1-1.5b, r1-7b) offline: their numbers, the hub loading path on a local folder, the vLLM
request building and engine set-up without vLLM, the datasets from ../shared/data, math grading, and notebooks
00, 01 and 05 end to end on r1-1.5b with a locally saved stand-in model."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from tsq_utils.model import base_model, generation
from tsq_utils.task import data
from tsq_utils.method import evaluation, sampling
from tsq_utils.core.config import ProfileError, load_profile
from tsq_utils.core.stage import setup_stage
from tsq_utils.task.registry import benchmark_list, get_task

REPO = Path(__file__).resolve().parent.parent
R1 = {"r1-1.5b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "r1-7b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}
AIME25_15B = "aime25_DeepSeek-R1-Distill-Qwen-1.5B_aime_25_rollout_temperature0.6.jsonl"


@pytest.fixture(scope="session")
def standin(tmp_path_factory) -> Path:
    """The tiny R1 stand-in model folder (built once per session, a few seconds)."""
    from tsq_utils.model.standin import build_standin

    return build_standin(tmp_path_factory.mktemp("standin") / "r1")


@pytest.fixture(scope="session")
def standin_tok(standin):
    return base_model.load_tokenizer(str(standin), "hub")


@pytest.fixture
def run_dirs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TSQ_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("TSQ_FIGURES_DIR", str(tmp_path / "figures"))
    return tmp_path / "runs"


# ----------------------------------------------------------------------------- the profiles


@pytest.mark.parametrize("name", list(R1))
def test_r1_profiles_hold_the_paper_numbers(name):
    p = load_profile(name)
    assert (p.model.source, p.model.path, p.model.dtype, p.model.local_override) == ("hub", R1[name], "bfloat16", "")
    assert p.device in ("auto", "cuda")
    assert p.data.train in data.BENCHMARKS and p.data.train not in p.data.eval
    assert p.data.eval == ["math500", "aime24", "aime25"] and p.data.n_eval_problems >= 500
    s = p.sampling
    assert (s.backend, s.n, s.temperature, s.top_p) == ("vllm", 24, 0.9, 0.95)  # N > 4 / alpha (02)
    assert 8192 <= s.max_new_tokens <= 16384
    c = p.selection
    assert (c.variant, c.alpha, c.max_pairs, c.extra_neg_ratio) == ("q_dyn", 0.2, 64, 1.5)
    r = p.refinement
    assert (r.enabled, r.n_candidates, r.window, r.epsilon, r.kl_reduction, r.temperature) == (
        True, 64, 512, 0.005, "mean", 1.0)
    t = p.training
    assert (t.beta, t.lam, t.eta, t.lr, t.max_length, t.bf16, t.gradient_checkpointing) == (
        0.1, 1.0, 0.5, 5e-6, 9000, True, True)
    assert t.batch_size * t.grad_accum * getattr(t, "num_processes", 1) == 128 and t.length_margin_sign in (-1, 1)
    e = p.evaluation
    assert (e.n_samples, e.temperature, e.max_new_tokens, e.budget) == (16, 0.6, 32768, 32768)
    # the engine's context holds the longest generation plus the prompt
    assert base_model.vllm_engine_kwargs(p.model.path, p)["max_model_len"] == 32768 + base_model.PROMPT_ROOM_TOKENS


def test_the_two_r1_profiles_differ_only_in_the_model():
    a, b = load_profile("r1-1.5b").to_dict(), load_profile("r1-7b").to_dict()
    for d in (a, b):
        del d["name"], d["description"], d["model"]["path"], d["sampling"]["batch_size"]
        # how the batch of 128 is laid out over GPUs (the 7B model trains on 8: ZeRO-3, accumulation 16)
        for key in ("grad_accum", "num_processes", "accelerate_config"):
            d["training"].pop(key, None)
    assert a == b


# Keys whose value the spec (docs/method.md) marks a **choice** (or the paper leaves unstated): each must say so in a
# comment.
CHOICE_KEYS = ["data.train", "data.n_train_problems", "sampling.n", "sampling.top_p", "sampling.max_new_tokens",
               "selection.q_fix", "refinement.kl_reduction", "refinement.max_step_tokens", "training.beta",
               "training.length_margin_sign", "training.epochs", "training.warmup_ratio", "evaluation.top_p"]


def _comment_for(text: str, dotted: str) -> str:
    """The comment on a key's line and the comment lines right above it, in a profile's YAML text."""
    section, key = dotted.split(".")
    lines, current = text.splitlines(), None
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line):
            current = line.split(":")[0]
        elif current == section and re.match(rf"^\s+{key}:", line):
            above = []
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                above.insert(0, lines[j])
                j -= 1
            return "\n".join(above + [line.partition("#")[2]])
    raise AssertionError(f"{dotted} is not set in the profile")


@pytest.mark.parametrize("name", list(R1))
@pytest.mark.parametrize("dotted", CHOICE_KEYS)
def test_r1_profiles_document_every_choice(name, dotted):
    assert "choice" in _comment_for((REPO / "profiles" / f"{name}.yaml").read_text(), dotted)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sampling.gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"sampling.gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
        ({"sampling.tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"sampling.max_model_len": 32768}, "max_model_len"),  # no room left for the prompt
        ({"sampling.max_model_len": -1}, "max_model_len"),
        ({"data.local_dir": 3}, "local_dir"),
        ({"device": "cpu"}, "needs a GPU"),  # vllm on a CPU-only profile
    ],
)
def test_new_config_keys_are_validated(overrides, message):
    with pytest.raises(ProfileError, match=message):
        load_profile("r1-1.5b", overrides)


def test_new_config_keys_defaults_leave_the_cpu_profiles_alone():
    for name in ("toy", "ci"):
        p = load_profile(name)
        assert p.sampling.backend == "transformers" and p.data.local_dir == ""
        s = p.sampling
        assert (s.gpu_memory_utilization, s.tensor_parallel_size, s.max_model_len) == (0.85, 1, 0)
    p = load_profile("r1-1.5b", {"sampling.max_model_len": 40000})
    assert base_model.vllm_engine_kwargs("m", p)["max_model_len"] == 40000


# ----------------------------------------------------------------------------- the hub path on a local folder


def test_hub_loading_path_on_a_locally_saved_folder(standin, run_dirs, monkeypatch):
    monkeypatch.setenv("TSQ_ALLOW_CPU", "1")  # the profile's device: cuda refuses the CPU unless asked
    stage = setup_stage("base_model", "r1-1.5b",
                        {"model.local_override": str(standin), "sampling.backend": "transformers"})
    model, tok, info = base_model.prepare_base(stage, progress=False)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert next(model.parameters()).device.type == "cpu"  # no GPU here, and TSQ_ALLOW_CPU asked for the CPU
    ptr = json.loads((stage.dir / "base_model.json").read_text())
    assert ptr == {"model": str(standin.resolve()), "kind": "hub", "hub_id": R1["r1-1.5b"], "local": True,
                   "dtype": "bfloat16"}
    # the R1 prompt: BOS text from the template, one <think>, opened by the template itself
    assert info["template_opens_think"] is True
    prompt = data.r1_prompt("What is $1+1$?", tok)
    assert prompt.startswith(tok.bos_token) and prompt.endswith("<think>\n") and prompt.count("<think>") == 1
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # later stages load what 00 recorded: the same weights; float32 master weights on request
    again, _ = base_model.load_base(stage.run_dir, stage.profile)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    fp32, _ = base_model.load_base(stage.run_dir, stage.profile, dtype="float32")
    assert fp32.dtype == torch.float32
    sampler, _ = base_model.load_base_sampler(stage.run_dir, stage.profile)  # transformers backend: the model
    assert isinstance(sampler, torch.nn.Module)
    assert base_model.base_inputs(stage.run_dir, stage.profile)["base_weights"] == standin.resolve()


def test_local_override_resolution_and_safetensors_only(standin, tmp_path):
    p = load_profile("r1-1.5b")
    assert base_model.hub_model_ref(p) == R1["r1-1.5b"]  # no local folder of that name: a hub id
    rel = os.path.relpath(standin, REPO)  # relative paths are taken from the repository root, not the cwd
    assert base_model.hub_model_ref(load_profile("r1-1.5b", {"model.local_override": rel})) == str(standin.resolve())
    with pytest.raises(FileNotFoundError, match="model.local_override"):
        base_model.hub_model_ref(load_profile("r1-1.5b", {"model.local_override": str(tmp_path / "absent")}))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / f).write_bytes((standin / f).read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        base_model.load_model(str(pickled), "hub", p)
    with pytest.raises(ValueError, match="kind"):
        base_model.load_model(str(standin), "gguf", p)
    assert base_model.local_model_dir(rel, "trained_model") == standin.resolve()
    with pytest.raises(FileNotFoundError, match="trained_model 'nowhere'"):
        base_model.local_model_dir("nowhere", "trained_model")


# ----------------------------------------------------------------------------- vLLM without vLLM


def test_vllm_request_building(standin_tok):
    assert generation.vllm_sampling_params(16, 0.9, 0.95, 16384, 7) == dict(n=16, temperature=0.9, top_p=0.95,
                                                                            max_tokens=16384, seed=7)
    assert generation.vllm_sampling_params(1, 0, 1, 64, 0, stop=["\n\n"])["stop"] == ["\n\n"]
    # vLLM's own max_tokens default is 16: every request sets it, and sample's default is far from 16
    assert generation.Decoding().max_new_tokens == 256
    prompts = [data.r1_prompt(q, standin_tok) for q in ("What is 2+2?", "Find $x$ if $x^2=4$.", "Compute 3!")]
    spec = generation.Decoding(n=4, temperature=0.6, top_p=0.95, max_new_tokens=32768, seed=11, stop=None)
    inputs, params = generation.vllm_requests(standin_tok, prompts, spec)
    for prompt, inp, kw in zip(prompts, inputs, params):
        # the token ids the transformers backend feeds, with the template's single BOS (no second one added)
        assert inp == {"prompt_token_ids": standin_tok(prompt, add_special_tokens=False)["input_ids"]}
        assert inp["prompt_token_ids"].count(standin_tok.bos_token_id) == 1
        assert {k: kw[k] for k in ("n", "temperature", "top_p", "max_tokens")} == dict(n=4, temperature=0.6, top_p=0.95,
                                                                                   max_tokens=32768)
        assert "stop" not in kw
    # vLLM seeds sample j of a request seed + j: every (prompt, sample) row gets its own stream
    rows = [kw["seed"] + j for kw in params for j in range(4)]
    assert len(set(rows)) == len(rows) == 12
    again = generation.vllm_requests(standin_tok, prompts, spec)[1]
    assert [kw["seed"] for kw in again] == [kw["seed"] for kw in params]  # seeded: the same requests again
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation.vllm_requests(standin_tok, prompts, generation.Decoding(4, 0.6, 0.95, 0, 11))


def test_vllm_backend_without_vllm_is_a_clear_import_error(standin, standin_tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # importing vllm now fails, installed or not
    with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\]"):
        generation.sample(object(), standin_tok, ["x"], backend="vllm")
    p = load_profile("r1-1.5b")
    with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\].*transformers"):
        base_model.make_vllm_engine(str(standin), p)
    with pytest.raises(ImportError, match="vLLM"):
        base_model.load_sampler(str(standin), "hub", p)


class _Completion:
    def __init__(self, index, text, finish_reason):
        self.index, self.text, self.finish_reason = index, text, finish_reason


class _FakeLLM:
    """Records its engine kwargs and generate() calls; answers from a script of (text, finish_reason) per sample."""

    instances: list = []
    script: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.shut = kwargs, [], False
        core = types.SimpleNamespace(shutdown=lambda: setattr(self, "shut", True))
        self.llm_engine = types.SimpleNamespace(engine_core=core)
        _FakeLLM.instances.append(self)

    def generate(self, inputs, params):
        self.calls.append((inputs, params))
        outs = []
        for kw in params:
            comps = [_Completion(j, *self.script[j % len(self.script)]) for j in range(kw.kwargs["n"])]
            outs.append(types.SimpleNamespace(outputs=comps[::-1]))  # vLLM may return samples out of order
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM = _FakeLLM
    mod.SamplingParams = lambda **kw: types.SimpleNamespace(kwargs=kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _FakeLLM.instances = []
    return mod


def test_vllm_engine_and_sampling_with_a_fake_engine(fake_vllm, standin, standin_tok, monkeypatch):
    p = load_profile("r1-1.5b", {"sampling.n": 4})
    engine, tok = base_model.load_sampler(str(standin), "hub", p)
    assert engine.kwargs == dict(model=str(standin), tokenizer=str(standin), dtype="bfloat16", seed=1234,
                                 gpu_memory_utilization=0.85, tensor_parallel_size=1, max_model_len=32768 + 2048,
                                 trust_remote_code=False)
    _FakeLLM.script = [
        ("Let me see.\n\n2+2=4.\n</think>\n\nThe answer is $\\boxed{4}$.", "stop"),
        ("Hmm.\n\nIt is 5.\n</think>\n\nSo $\\boxed{5}$.", "stop"),
        ("Let me think.\n\nNo box here.\n</think>\n\nFour.", "stop"),
        ("Long.\n\n\\boxed{4} and still going", "length"),  # cut at max_tokens: never correct
    ]
    problems = pd.DataFrame({"problem_id": ["a", "b"], "k": [1, 2], "gold": ["4", "\\frac{8}{2}"],
                             "prompt": [data.r1_prompt(q, tok) for q in ("What is 2+2?", "What is 8/2?")]})
    spec = generation.Decoding(n=4, temperature=0.9, top_p=0.95, max_new_tokens=16384, seed=3)
    df = sampling.sample_and_grade(engine, tok, problems, get_task("math500"), spec,
                                   sampling.SampleRun(backend="vllm", progress=False))
    assert list(df["status"]) == ["correct", "wrong", "no_answer", "no_answer"] * 2  # \frac{8}{2} = 4 by math-verify
    assert list(df["finish_reason"]) == ["stop", "stop", "stop", "length"] * 2
    assert list(df["sample_idx"]) == [0, 1, 2, 3] * 2  # put back in sample order
    assert list(df["n_tokens"]) == [generation.count_tokens(tok, t) for t in df["text"]]
    inputs, params = engine.calls[0]
    assert [kw.kwargs["max_tokens"] for kw in params] == [16384, 16384]
    assert inputs[0]["prompt_token_ids"] == tok(problems["prompt"][0], add_special_tokens=False)["input_ids"]
    # without a GPU the engine is refused before vLLM starts
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        base_model.make_vllm_engine(str(standin), p)


def test_samplers_hold_one_vllm_engine_at_a_time(fake_vllm, standin):
    p = load_profile("r1-1.5b")
    models = base_model.Samplers(p, {"base": (str(standin), "hub"), "tokensqueeze": (str(standin), "hub")})
    assert "base" in models and "other" not in models and not _FakeLLM.instances  # membership loads nothing
    base = models["base"]
    assert models["base"] is base and len(_FakeLLM.instances) == 1
    trained = models["tokensqueeze"]
    assert base.shut and not trained.shut and len(_FakeLLM.instances) == 2  # the first engine was shut down
    models.close()
    assert trained.shut
    with pytest.raises(KeyError):
        models["other"]
    with pytest.raises(ValueError, match="kind"):
        base_model.Samplers(p, {"base": (str(standin), "gguf")})


# ----------------------------------------------------------------------------- no silent CPU run, tensor parallel


DRIVER_545 = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  545.23.08  Mon Nov  6 23:49:37 UTC 2023\n"


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """torch as a CUDA 13.0 build that sees no GPU on a machine whose driver (545, /proc only) is too old."""
    import shutil

    from tsq_utils.core import config

    def refuse():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12030).")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", refuse)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    proc = tmp_path / "nvidia_version"
    proc.write_text(DRIVER_545)
    monkeypatch.setattr(config, "NVIDIA_VERSION_FILE", proc)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # no nvidia-smi
    monkeypatch.delenv("TSQ_ALLOW_CPU", raising=False)
    return proc


@pytest.mark.parametrize("name", list(R1))
def test_a_gpu_profile_refuses_the_cpu_naming_the_driver_and_cuda(name, no_gpu, standin, monkeypatch, tmp_path):
    import shutil
    import warnings

    from tsq_utils.core.config import resolve_device

    p = load_profile(name)
    assert p.device == "cuda"
    with pytest.raises(RuntimeError, match=r"(?s)CUDA 13\.0 build.*driver 545\.23\.08.*too old.*>= 580.*TSQ_ALLOW_CPU"):
        resolve_device(p)
    # every model load goes through it: the transformers path refuses before any weights move
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*driver 545"):
        base_model.load_model(str(standin), "hub", p)
    # nvidia-smi, where present, names the driver
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 575.51.03\n")
    smi.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: str(smi) if cmd == "nvidia-smi" else None)
    with pytest.raises(RuntimeError, match=r"driver 575\.51\.03.*too old"):
        resolve_device(p)
    # asked for: device cpu (with the transformers backend) or TSQ_ALLOW_CPU=1
    assert resolve_device(load_profile(name, {"device": "cpu", "sampling.backend": "transformers"})) == "cpu"
    monkeypatch.setenv("TSQ_ALLOW_CPU", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_device(p) == "cpu"
    assert any("TSQ_ALLOW_CPU" in str(w.message) for w in caught)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(p) == "cuda"


def test_no_driver_and_a_cpu_build_are_named_too(no_gpu, monkeypatch, fake_vllm, standin):
    from tsq_utils.core import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # fake_vllm said True
    no_gpu.unlink()
    with pytest.raises(RuntimeError, match=r"(?s)CUDA 13\.0 build; NVIDIA driver not found.*No NVIDIA driver"):
        config.resolve_device(load_profile("r1-7b"))
    # the vLLM engine's own refusal carries the same diagnosis
    with pytest.raises(RuntimeError, match=r"(?s)sampling.backend 'vllm' needs a CUDA GPU.*driver not found"):
        base_model.make_vllm_engine(str(standin), load_profile("r1-7b"))
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="CPU-only build"):
        config.resolve_device(load_profile("r1-1.5b"))
    assert config.resolve_device(load_profile("toy")) == "cpu"  # CPU profiles are untouched


def test_tensor_parallel_must_divide_the_attention_heads(fake_vllm, standin):
    # R1-Distill-Qwen-1.5B: 12 query heads, 2 key/value heads, MLP 8960; 7B: 28, 4 and 18944 (their config.json)
    assert base_model.model_shape(R1["r1-1.5b"]) == (12, 2, 8960)
    assert base_model.model_shape(R1["r1-7b"]) == (28, 4, 18944)
    for name in R1:
        assert base_model.tensor_parallel_sizes(*base_model.model_shape(R1[name]), upto=8) == [1, 2, 4]
        for tp in (3, 6, 7, 8):
            p = load_profile(name, {"sampling.tensor_parallel_size": tp})
            with pytest.raises(ValueError, match=rf"tensor_parallel_size {tp} does not divide.*use one of 1, 2, 4"):
                base_model.make_vllm_engine(R1[name], p)
        engine = base_model.make_vllm_engine(R1[name], load_profile(name, {"sampling.tensor_parallel_size": 4}))
        assert engine.kwargs["tensor_parallel_size"] == 4
    # a local folder's config.json wins (the stand-in: 2 heads, 2 key/value heads)
    assert base_model.model_shape(str(standin)) == (2, 2, 128)
    with pytest.raises(ValueError, match="tensor_parallel_size 4 does not divide"):
        base_model.make_vllm_engine(str(standin), load_profile("r1-1.5b", {"sampling.tensor_parallel_size": 4}))
    assert base_model.model_shape("some/unknown-model") is None  # unknown: vLLM checks it itself


# ----------------------------------------------------------------------------- datasets


def test_r1_eval_sets_from_shared_data(shared_data, standin_tok):
    p = load_profile("r1-1.5b", {"data.local_dir": str(shared_data)})
    problems = evaluation.eval_problems(p, standin_tok)
    assert {b: len(df) for b, df in problems.items()} == {"math500": 500, "aime24": 30, "aime25": 30}
    assert problems["math500"].iloc[0]["gold"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert problems["aime24"].iloc[0]["gold"] == "204" and problems["aime25"].iloc[0]["gold"] == "70"
    assert set(problems["math500"]["k"]) == {1, 2, 3, 4, 5}
    for df in problems.values():
        assert df["prompt"].str.endswith("<think>\n").all()
        assert df["prompt"].str.contains(data.R1_INSTRUCTION, regex=False).all()
    # a local_files entry wins over local_dir; a relative local_dir is taken from the repository root
    rel = os.path.relpath(shared_data, REPO)
    p = load_profile("r1-1.5b", {"data.local_dir": rel, "data.local_files": {"aime25": str(shared_data / AIME25_15B)},
                                 "data.n_eval_problems": 3})
    problems = evaluation.eval_problems(p, standin_tok)
    assert problems["aime25"]["source"].iloc[0] == str(shared_data / AIME25_15B) and len(problems["math500"]) == 3
    # MATH train ships no local copy: the error names the file and the keys to set
    with pytest.raises(FileNotFoundError, match=r"math_train\.jsonl.*data\.local_files"):
        sampling.training_problems(load_profile("r1-1.5b", {"data.local_dir": str(shared_data)}), standin_tok)


def test_local_dir_that_is_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.local_dir"):
        data.local_path_for("math500", {}, tmp_path / "nowhere")
    assert data.local_path_for("math500", {}, "") is None  # the hub
    with pytest.raises(ValueError, match="unknown benchmark"):
        data.local_path_for("math5000", {}, tmp_path)


def test_math_train_local_file_gold_levels_and_seeded_subset(tmp_path, standin_tok):
    path = tmp_path / "math_train.jsonl"
    rows = [{"problem": f"Problem {i}: compute something.", "level": f"Level {1 + i % 5}", "type": "Algebra",
             "solution": f"First $\\boxed{{0}}$ is a distractor; so the answer is $\\boxed{{\\frac{{{i}}}{{7}}}}$."}
            for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = load_profile("r1-1.5b", {"data.local_files": {"math_train": str(path)}, "data.n_train_problems": 5})
    df = sampling.training_problems(p, standin_tok)
    assert len(df) == 5 and df["problem_id"].is_unique
    idx = [int(pid.split("/")[1]) for pid in df["problem_id"]]
    assert idx == sorted(idx) and idx != [0, 1, 2, 3, 4]  # a seeded random subset, in file order
    assert list(df["gold"]) == [f"\\frac{{{i}}}{{7}}" for i in idx]  # the solution's last box
    assert list(df["k"]) == [1 + i % 5 for i in idx]
    assert df["prompt"].str.endswith("<think>\n").all()
    assert df.equals(sampling.training_problems(p, standin_tok))  # the same subset every time
    other = sampling.training_problems(load_profile("r1-1.5b", {"data.local_files": {"math_train": str(path)},
                                                                "data.n_train_problems": 5, "seed": 7}), standin_tok)
    assert list(other["problem_id"]) != list(df["problem_id"])
    whole = sampling.training_problems(load_profile("r1-1.5b", {"data.local_files": {"math_train": str(path)}}),
                                       standin_tok)
    assert list(whole["problem_id"]) == [f"math_train/{i}" for i in range(20)]
    path.write_text(json.dumps({"problem": "P", "solution": "no boxed answer here"}) + "\n")
    with pytest.raises(ValueError, match=r"record 0 .*boxed"):
        sampling.training_problems(p, standin_tok)


def test_benchmark_list():
    assert benchmark_list("math500, aime24") == ["math500", "aime24"]
    assert benchmark_list(["toy"]) == ["toy"] and benchmark_list(None) is None
    with pytest.raises(ValueError, match="unknown math5000"):
        benchmark_list("math500,math5000")
    with pytest.raises(ValueError, match="none given"):
        benchmark_list(" , ")


# ----------------------------------------------------------------------------- grading and metrics


def test_math_grading_and_metrics_on_r1_style_responses():
    texts = [
        "Let me compute.\n\nf(-2)+f(-1)+f(0) = 14/3.\n</think>\n\nThe answer is $\\boxed{\\dfrac{14}{3}}$.",
        "Hmm.\n</think>\n\nSo $\\boxed{4.6}$.",
        "The point is $(3, \\pi/2)$.\n</think>\n\n$\\boxed{(3, \\frac{\\pi}{2})}$",
        "Maybe \\boxed{9}?\n\nNo.\n</think>\n\nIt is nine.",  # boxed only while thinking: the answer part has none
        "Done.\n</think>\n\nEvelyn has the greatest speed, so the answer is $\\boxed{\\text{Evelyn}}$.",
    ]
    golds = ["\\frac{14}{3}", "\\frac{14}{3}", "\\left( 3, \\frac{\\pi}{2} \\right)", "9", "\\text{Evelyn}"]
    status = get_task("math500").grade(texts, golds)
    assert status == ["correct", "wrong", "correct", "no_answer", "correct"]
    results = pd.DataFrame({"model": "base", "benchmark": "math500", "problem_id": ["p0", "p1", "p2", "p3", "p4"],
                            "correct": [s == "correct" for s in status], "n_tokens": [1000, 2000, 3000, 4000, 5000]})
    m = evaluation.metrics_table(results, budget=32768).loc[("base", "math500")]
    assert m["acc"] == pytest.approx(0.6) and m["len_t"] == pytest.approx(3000) and m["len_a"] == pytest.approx(3000)
    assert m["auc"] == pytest.approx((3 - 9000 / 32768) / 5)  # mean of correct * (1 - len / B)
    # a model with no correct response has no Len-T: the headline prints nan and its JSON holds null
    none_right = results.assign(model="tokensqueeze", correct=False)
    head = evaluation.headline(evaluation.metrics_table(pd.concat([results, none_right]), 32768), "math500")
    assert head["len_t_base"] == pytest.approx(3000) and head["len_t_trained"] != head["len_t_trained"]
    safe = evaluation.json_safe(head)
    assert safe["len_t_trained"] is None and safe["acc_trained"] == 0.0 and json.loads(json.dumps(safe)) == safe


# ----------------------------------------------------------------------------- end to end on CPU


def test_notebooks_00_01_05_on_r1_with_a_standin(standin, tmp_path):
    """The README's CPU smoke command: the real prompt, sampling, math-verify grading and metrics on 5 MATH500
    problems."""
    math500 = REPO.parent / "shared" / "data" / "math500_test.jsonl"
    if not math500.is_file():
        pytest.skip("../shared/data/math500_test.jsonl is absent")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSQ_")}
    env.update(TSQ_SKIP_SETUP="1", TSQ_PYTHON=sys.executable, TSQ_KERNEL="python3", OMP_NUM_THREADS="1",
               TSQ_ALLOW_CPU="1",  # the profile's device: cuda refuses the CPU unless asked
               TSQ_RUNS_DIR=str(tmp_path / "runs"), TSQ_FIGURES_DIR=str(tmp_path / "figures"))
    cmd = ["bash", str(REPO / "run_all.sh"), "--profile", "r1-1.5b", "--only", "00,01,05",
           "-p", "model_override", str(standin), "-p", "backend", "transformers", "-p", "data_dir", str(math500.parent),
           "-p", "train_set", "math500", "-p", "eval_sets", "math500", "-p", "n_problems", "5", "-p", "n_samples", "2",
           "-p", "max_new_tokens", "64", "-p", "trained_model", str(standin)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "r1-1.5b"
    assert json.loads((run / "base_model" / "base_model.json").read_text())["model"] == str(standin.resolve())
    assert not (run / "base_model" / "heldout_greedy.parquet").exists()  # the toy-world cells were skipped
    tok = base_model.load_tokenizer(str(standin), "hub")
    samples = pd.read_parquet(run / "sampling" / "samples.parquet")
    assert len(samples) == 10 and samples["problem_id"].str.startswith("math500/").all()
    assert samples["prompt"].str.startswith(tok.bos_token).all() and samples["prompt"].str.endswith("<think>\n").all()
    assert list(samples["n_tokens"]) == [generation.count_tokens(tok, t) for t in samples["text"]]
    results = pd.read_parquet(run / "evaluation" / "results.parquet")
    assert len(results) == 2 * 5 * 2 and set(results["benchmark"]) == {"math500"}
    # math-verify gave verdicts on boxed answers (the stand-in boxes 9 or 3)
    assert "wrong" in set(results["status"]) and set(results["status"]) <= {"correct", "wrong", "no_answer"}
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    for name in ("base", "tokensqueeze"):
        got = metrics[name]["math500"]
        part = results[results["model"] == name]
        assert got["n"] == 10 and got["acc"] == pytest.approx(part["correct"].mean())
        assert got["auc"] == pytest.approx(evaluation.auc(part["correct"], part["n_tokens"], 32768))
    assert (tmp_path / "figures" / "r1-1.5b" / "fig3_budget_curve.png").is_file()


def test_first_gpu_script_runs_its_steps_on_the_cpu(tmp_path):
    """scripts/first_gpu_check.py --cpu-smoke runs every check of the GPU mode at toy size, on the r1-1.5b profile
    with the R1 stand-in: the tokenizer round-trip on real R1 traces, the profile's sampling settings on MATH500, the
    profile's refinement modes (branch / fast / spans), DPO-L steps, the 2-process training entry under accelerate
    (gloo, max_steps unset) and 2 data-parallel engines through vllm_shards."""
    if not (REPO.parent / "shared" / "data" / "math500_test.jsonl").is_file():
        pytest.skip("../shared/data is absent")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSQ_")}
    env.update(TSQ_RUNS_DIR=str(tmp_path / "runs"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "first_gpu_check.py"), "--cpu-smoke", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = r.stdout.split("== summary")[1]
    for check in ("install", "tokenizer", "sampling", "refinement", "training", "train-2proc", "sample-2dp"):
        assert re.search(rf"^PASS {check} ", summary, re.M), summary
    assert "FAIL" not in summary and "SKIP" not in summary
    assert "candidates branch, scoring fast, steps spans" in summary  # the profile's modes, not the defaults
    assert "T=0.9 top-p 0.95" in summary and "round-trip exactly" in summary
    assert "2 gloo processes" in summary and "max_steps unset" in summary
    assert "same answers as one engine" in summary and "both engines shut down" in summary


def test_global_batch_of_the_r1_profiles_is_the_papers_128():
    from tsq_utils.method.dpo_l import global_batch

    for name in ("r1-1.5b", "r1-7b"):
        assert global_batch(load_profile(name).training) == 128
