"""Scale-out on CPU: DPO-L training in 2 processes (gloo, launched by accelerate as on GPUs) matches 1 process, and
saves one model; the accelerate configs are valid."""

import random
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_toy_model

from tsq_utils.method import dpo_l
from tsq_utils.task import toy as tw
from tsq_utils.core.config import ToyWorldConfig, TrainingConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_toy_tokenizer):
    """A saved tiny toy reasoner (the processes load it by path) and 16 toy pairs: oracle-short vs verbose traces."""
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("dist") / "base"
    tiny_toy_model(tiny_toy_tokenizer).save_pretrained(base)
    tiny_toy_tokenizer.save_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    rng, verbose = random.Random(0), ToyWorldConfig(p_concise=0.0)
    probs = tw.make_problems(16, seed=1)
    pairs = pd.DataFrame({"prompt": [tw.prompt_for(p.question, tok) for p in probs],
                          "chosen": [tw.oracle_trace(p) for p in probs],
                          "rejected": [tw.teacher_trace(p, rng, verbose) for p in probs]})
    return base, tok, pairs


def _train(toy, out: Path, n_proc: int, per_device: int, eta: float, max_steps: int | None = None):
    from transformers import LlamaForCausalLM

    base, tok, pairs = toy
    cfg = TrainingConfig(batch_size=per_device, lr=1e-3, epochs=1.0, warmup_ratio=0.0, max_length=256, eta=eta)
    cfg.num_processes = n_proc  # training.num_processes
    assert dpo_l.global_batch(cfg) == 8
    log = dpo_l.train_and_save(LlamaForCausalLM.from_pretrained(base), tok, pairs, cfg, out,
                               dpo_l.TrainRun(seed=3, device="cpu", max_steps=max_steps))
    return log, LlamaForCausalLM.from_pretrained(out / "model")


def test_two_gloo_processes_train_like_one(toy, tmp_path):
    """Global batch 8 as 1 x 8 and as 2 processes x 4, one epoch with max_steps unset (the r1 profiles' setting): the
    reference log-probs are precomputed in both (no second model), the 2 processes read them without a cache file
    (issue 23: ranks >= 1 failed on rank 0's temporary Arrow file), and both train the same pairs per step to the
    same DPO-L + SFT losses and weights. The SFT term is the token mean over the whole step's chosen tokens, so it
    is the same split over processes too (it used to be taken per process)."""
    _, _, pairs = toy
    cfg = TrainingConfig(batch_size=4)
    cfg.num_processes = 2
    assert not dpo_l.build._shorter_than_an_epoch(cfg, None, len(pairs))  # the precompute path
    log1, m1 = _train(toy, tmp_path / "one", 1, 8, eta=0.5)
    log2, m2 = _train(toy, tmp_path / "two", 2, 4, eta=0.5)
    assert list(log2.index) == [1, 2]
    for col in ("loss", "dpo_l_loss", "sft_loss"):
        assert log2[col].tolist() == pytest.approx(log1[col].tolist(), rel=1e-5), col
    for a, b in zip(m1.parameters(), m2.parameters()):
        # two processes average their gradients in another order than one: float noise of order 1e-5 after two
        # AdamW steps at lr 1e-3 (a wrong batch split moves weights by about the learning rate)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)
    # one saved model, written once (rank 0), and no scratch left behind
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["model"]
    assert sorted(p.name for p in (tmp_path / "two" / "model").glob("*.safetensors")) == ["model.safetensors"]
    assert not list((tmp_path / "two" / "model").glob("*.bin"))


def test_launch_command_uses_the_profiles_accelerate_config(tmp_path):
    cfg = TrainingConfig(batch_size=1, grad_accum=16)
    cfg.num_processes, cfg.accelerate_config = 8, "zero3"
    cmd = dpo_l.launch_command(tmp_path / "job.json", cfg, "cuda")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(REPO / "configs" / "accelerate" / "zero3.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    assert cmd[-4:] == ["-m", "tsq_utils.method.train_entry", "--job", str(tmp_path / "job.json")]
    with pytest.raises(ValueError, match="unknown accelerate config"):
        dpo_l.accelerate_config_file("zero4")


@pytest.mark.parametrize("name", dpo_l.ACCELERATE_CONFIGS)
def test_accelerate_configs_are_valid(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = dpo_l.accelerate_config_file(name)
    raw = yaml.safe_load(path.read_text())
    cc = ClusterConfig.from_yaml_file(str(path))
    assert cc.mixed_precision == "bf16" and cc.num_machines == 1
    assert raw["distributed_type"] == {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED",
                                       "fsdp2": "FSDP"}[name]
    if name.startswith("zero"):
        import json

        ds_file = raw["deepspeed_config"]["deepspeed_config_file"]
        assert REPO / ds_file == dpo_l.deepspeed_config_file(name)
        assert json.loads((REPO / ds_file).read_text())["zero_optimization"]["stage"] == int(name[-1])
    if name == "fsdp2":
        assert raw["fsdp_config"]["fsdp_version"] == 2


def test_entry_point_refuses_a_run_without_pairs(tmp_path):
    from tsq_utils.method import train_entry

    with pytest.raises(FileNotFoundError, match="03_kl_refinement"):
        train_entry.job_from_profile("toy", tmp_path)
    with pytest.raises(SystemExit):
        train_entry.main([])


def test_step_printer_prints_a_line_per_twentieth_on_the_main_process(capsys):
    # what a notebook shows of a launched training: 20 lines for 415 steps (every 20th step and the last), none on
    # the other ranks and none for a log without a loss (the run's closing summary)
    from types import SimpleNamespace

    from tsq_utils.method.train_entry import StepPrinter

    printer = StepPrinter()
    for rank0 in (True, False):
        for step in range(1, 416):
            state = SimpleNamespace(max_steps=415, global_step=step, is_world_process_zero=rank0)
            printer.on_log(None, state, None, logs={"loss": 0.5, "dpo_l_loss": 0.25, "sft_loss": 0.125})
        printer.on_log(None, state, None, logs={"train_runtime": 1.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 20/415: loss 0.5000, dpo_l_loss 0.2500, sft_loss 0.1250"
    assert [ln.split(":")[0] for ln in lines] == [f"step {s}/415" for s in [*range(20, 416, 20), 415]]
