"""Tests for tsq_utils.method.dpo_l: DPO-L + SFT against closed forms and TRL's own losses, on a tiny random Llama."""

import dataclasses
import math
import string
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from tsq_utils.model.compat import checkpointing_kwargs
from tsq_utils.core.config import TrainingConfig
from tsq_utils.method import dpo_l
from tsq_utils.method.dpo_l import (
    DPOLConfig,
    DPOLTrainer,
    NonFiniteLossError,
    TrainerOptions,
    TrainRun,
    checkpoint_settings,
    global_batch,
    make_dpo_l_trainer,
    master_weights_fp32,
    pairs_to_dataset,
    training_log,
)

datasets.disable_progress_bars()


def _trainer(model, ref_model, tok, pairs, cfg, out, seed=0, max_steps=None, device="auto", ref_cache=None, **opts):
    """make_dpo_l_trainer with its TrainRun and TrainerOptions from keywords (other keywords: DPOConfig overrides)."""
    run = TrainRun(seed=seed, device=device, max_steps=max_steps, ref_cache=ref_cache)
    named = {k: opts.pop(k) for k in ("eval_pairs", "callbacks", "args", "precompute_ref_log_probs") if k in opts}
    return make_dpo_l_trainer(model, ref_model, tok, pairs, cfg, out, run, TrainerOptions(**named, overrides=opts))


def _train_and_save(model, tok, pairs, cfg, stage_dir, seed=0, max_steps=None, device="cpu", progress=True):
    """dpo_l.train_and_save with its TrainRun from keywords."""
    run = TrainRun(seed=seed, device=device, max_steps=max_steps, progress=progress)
    return dpo_l.train_and_save(model, tok, pairs, cfg, stage_dir, run)

SPECIAL = ["<pad>", "<eos>", "<bos>", "<think>", "</think>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"

# Chosen shorter than rejected in every pair; the completions look like the toy world's
PAIRS = pd.DataFrame({
    "prompt": ["Q: 3+4 <think>\n", "Q: 5-2+1 <think>\n", "Q: 9+9 <think>\n", "Q: 1+1+1 <think>\n"],
    "chosen": ["a3: 3\n\nb+4: 7\n</think>\n\n\\boxed{7}", "4\n</think>\n\n\\boxed{4}",
               "18\n</think>\n\n\\boxed{18}", "a1: 1\n\nb+1: 2\n\nc+1: 3\n</think>\n\n\\boxed{3}"],
    "rejected": ["We start with 3, so 3.\n\nAdd 4: 7. Check: 7.\n</think>\n\n\\boxed{7}",
                 "a5: 5\n\nb-2: 3\n\nc+1: 4\n\nreview: ok\n</think>\n\n\\boxed{4}",
                 "a9: 9\n\nb+9: 18\n\ncheck 9+9=18\n</think>\n\n\\boxed{18}",
                 "a1: 1\n\nb+1: 2\n\nc+1: 3\n\nwait, again: 3\n</think>\n\n\\boxed{3}"],
})


def _tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A char-level tokenizer with <pad>/<eos> (and optionally a BOS-prepending post-processor)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS) + ["<unk>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", additional_special_tokens=["<think>", "</think>"])


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _tokenizer()


def _model(tok, seed: int = 0, noise: float = 0.0) -> LlamaForCausalLM:
    """A fresh tiny Llama; noise > 0 perturbs every weight (a policy that differs from the reference)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    if noise:
        _perturb(model, seed=seed + 1, scale=noise)
    return model


@torch.no_grad()
def _perturb(model, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))


def _common_args(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", save_strategy="no",
                use_cpu=True, bf16=False, dataloader_pin_memory=False, **checkpointing_kwargs(False, DPOLConfig))


def _dpol(tok, tmp_path, policy, ref, pairs=PAIRS, **kw) -> DPOLTrainer:
    args = DPOLConfig(**_common_args(tmp_path), **kw)
    return DPOLTrainer(policy, ref, args=args, train_dataset=pairs_to_dataset(pairs, tok), processing_class=tok)


def _batch(trainer) -> dict:
    ds = trainer.train_dataset
    return trainer.data_collator([ds[i] for i in range(len(ds))])


@torch.no_grad()
def _loss(trainer, batch) -> torch.Tensor:
    return trainer.compute_loss(trainer.model, batch)


def _lengths(tok, pairs=PAIRS) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ by hand: the tokenizer's tokens of each completion plus the EOS TRL appends."""
    def n(texts):
        return torch.tensor([len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts],
                            dtype=torch.float64)
    return n(pairs["chosen"]), n(pairs["rejected"])


@torch.no_grad()
def _token_logps(model, batch) -> torch.Tensor:
    """Per-token log-probs of the completion tokens from a plain forward (0 elsewhere)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logps * batch["completion_mask"][:, 1:]


def _by_hand(tok, policy, ref, batch, beta, lam, sign, eta, pairs=PAIRS) -> torch.Tensor:
    """η·DPO-L + (1−η)·SFT written as plain DPO whose reference chosen log-prob is shifted by margin/β."""
    pol, rf = _token_logps(policy, batch), _token_logps(ref, batch)
    c, r = pol.sum(1).double().chunk(2)
    rc, rr = rf.sum(1).double().chunk(2)
    lw, ll = _lengths(tok, pairs)
    margin = sign * lam * torch.log(ll / lw)
    rc_shifted = rc - margin / beta
    dpo = -F.logsigmoid(beta * ((c - rc_shifted) - (r - rr))).mean()
    chosen_mask = batch["completion_mask"][:, 1:].chunk(2)[0].bool()
    sft = -pol.chunk(2)[0][chosen_mask].double().mean()
    return eta * dpo + (1 - eta) * sft


def test_lambda0_eta1_equals_trl_sigmoid(tok, tmp_path):
    ours = _dpol(tok, tmp_path, _model(tok, noise=0.3), _model(tok), length_lambda=0.0, sft_eta=1.0)
    trl = DPOTrainer(_model(tok, noise=0.3), _model(tok), args=DPOConfig(**_common_args(tmp_path), beta=0.1),
                     train_dataset=pairs_to_dataset(PAIRS, tok), processing_class=tok)
    batch = _batch(ours)
    assert torch.equal(batch["input_ids"], _batch(trl)["input_ids"])
    expected = _loss(trl, batch)
    assert abs(expected.item() - math.log(2)) > 1e-3  # the policy really differs from the reference
    torch.testing.assert_close(_loss(ours, batch), expected)
    for key in ("rewards/margins", "rewards/accuracies", "logps/chosen", "entropy", "mean_token_accuracy"):
        assert ours._metrics["train"][key][-1] == pytest.approx(trl._metrics["train"][key][-1], rel=1e-5)


def test_lambda0_eta_below1_equals_trl_sigmoid_plus_sft(tok, tmp_path):
    eta = 0.3
    ours = _dpol(tok, tmp_path, _model(tok, noise=0.3), _model(tok), length_lambda=0.0, sft_eta=eta)
    trl_args = DPOConfig(**_common_args(tmp_path), beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[eta, 1 - eta])
    trl = DPOTrainer(_model(tok, noise=0.3), _model(tok), args=trl_args, train_dataset=pairs_to_dataset(PAIRS, tok),
                     processing_class=tok)
    batch = _batch(ours)
    torch.testing.assert_close(_loss(ours, batch), _loss(trl, batch))


def test_equal_lengths_give_zero_margin(tok, tmp_path):
    pairs = pd.DataFrame({"prompt": ["Q: 2+2 <think>\n", "Q: 7-1 <think>\n"],
                          "chosen": ["4\n</think>\n\n\\boxed{4}", "a7: 7\n\nb-1: 6\n</think>\n\n\\boxed{6}"],
                          "rejected": ["5\n</think>\n\n\\boxed{5}", "a7: 7\n\nb-1: 5\n</think>\n\n\\boxed{5}"]})
    losses = []
    for lam, sign in [(0.0, -1), (1.0, -1), (2.0, 1)]:
        trainer = _dpol(tok, tmp_path, _model(tok, noise=0.3), _model(tok), pairs, length_lambda=lam,
                        length_margin_sign=sign)
        losses.append(_loss(trainer, _batch(trainer)))
        assert trainer._metrics["train"]["length_margin"][-1] == 0.0
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(losses[2], losses[0])


def test_sign_direction_closed_form_at_reference(tok, tmp_path):
    # Policy = reference, so Δ = 0 and a pair's loss is −log σ(s·λ·log(ℓ_l/ℓ_w)): with λ = 1 that is
    # log((ℓ_w+ℓ_l)/ℓ_l) for s = +1 and log((ℓ_w+ℓ_l)/ℓ_w) for s = −1. Chosen is shorter in every pair, so
    # s = +1 (head start) gives the LOWER loss and s = −1 (required margin) the higher one.
    lw, ll = _lengths(tok)
    assert bool((lw < ll).all())
    losses = {}
    for sign in (1, -1):
        trainer = _dpol(tok, tmp_path, _model(tok), _model(tok), length_lambda=1.0, sft_eta=1.0,
                        length_margin_sign=sign)
        losses[sign] = _loss(trainer, _batch(trainer)).item()
        assert trainer._metrics["train"]["length_margin"][-1] == pytest.approx(
            (sign * torch.log(ll / lw)).mean().item(), rel=1e-5)
    assert losses[1] == pytest.approx(torch.log((lw + ll) / ll).mean().item(), rel=1e-5)
    assert losses[-1] == pytest.approx(torch.log((lw + ll) / lw).mean().item(), rel=1e-5)
    assert losses[1] < math.log(2) < losses[-1]


@pytest.mark.parametrize("sign", [1, -1])
def test_loss_equals_shifted_reference_formulation(tok, tmp_path, sign):
    beta, lam, eta = 0.25, 0.7, 0.4
    policy, ref = _model(tok, noise=0.3), _model(tok)
    trainer = _dpol(tok, tmp_path, policy, ref, beta=beta, length_lambda=lam, sft_eta=eta, length_margin_sign=sign)
    batch = _batch(trainer)
    expected = _by_hand(tok, policy, ref, batch, beta, lam, sign, eta)
    torch.testing.assert_close(_loss(trainer, batch).double(), expected, rtol=1e-5, atol=1e-6)


def test_precomputed_reference_matches_by_hand(tok, tmp_path):
    # No reference model: TRL scores the data with the initial policy before training; the policy then moves
    policy = _model(tok)
    trainer = _dpol(tok, tmp_path, policy, None, precompute_ref_log_probs=True, sft_eta=0.5)
    assert trainer.ref_model is None
    _perturb(policy, seed=7, scale=0.3)
    batch = _batch(trainer)
    assert "ref_chosen_logps" in batch
    expected = _by_hand(tok, policy, _model(tok), batch, 0.1, 1.0, -1, 0.5)
    torch.testing.assert_close(_loss(trainer, batch).double(), expected, rtol=1e-5, atol=1e-6)


def _cfg(**kw) -> TrainingConfig:
    base = dict(batch_size=4, lr=1e-2, epochs=1.0, warmup_ratio=0.0, max_length=256)
    return TrainingConfig(**{**base, **kw})


def test_training_changes_parameters_and_logs_closed_form(tok, tmp_path):
    model = _model(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(model, None, tok, PAIRS, _cfg(), tmp_path, seed=3, max_steps=3)
    trainer.train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)
    log = training_log(trainer)
    assert list(log.index) == [1, 2, 3]
    for key in ("loss", "dpo_l_loss", "sft_loss", "length_margin", "rewards/margins", "rewards/accuracies"):
        assert key in log.columns
    # Step 1 sees all 4 pairs with policy = reference: DPO-L (s = −1, λ = 1) is mean log((ℓ_w+ℓ_l)/ℓ_w)
    lw, ll = _lengths(tok)
    first = log.loc[1]
    assert first["dpo_l_loss"] == pytest.approx(torch.log((lw + ll) / lw).mean().item(), rel=1e-5)
    assert first["length_margin"] == pytest.approx(-torch.log(ll / lw).mean().item(), rel=1e-5)
    assert first["loss"] == pytest.approx(0.5 * first["dpo_l_loss"] + 0.5 * first["sft_loss"], rel=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert log.loc[3, "loss"] < first["loss"]


def test_nan_loss_raises_naming_the_step(tok, tmp_path):
    model = _model(tok)
    trainer = _trainer(model, _model(tok), tok, PAIRS, _cfg(), tmp_path, seed=0, max_steps=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"train step 1 ") as err:
        trainer.train()
    assert err.value.step == 1 and err.value.details["policy_logps_finite"] is False
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("rows_per_forward", [None, 0, 1, 3])
def test_split_forward_equals_the_joint_forward_on_real_tokens(tok, tmp_path, rows_per_forward):
    # grouped by length (None: the default groups; 1 and 3: groups that mix chosen and rejected rows, the last one
    # short) or by halves (0): the same log-probs and gradients as one joint forward, rows in the batch's order
    from tsq_utils.method.dpo_l import split_forward

    policy = _model(tok)
    batch = _batch(_dpol(tok, tmp_path, policy, _model(tok)))
    mask = batch["completion_mask"][:, 1:]
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    joint = policy(**kw, labels=labels, fused_lm_head=True)
    (joint.log_probs[:, -mask.size(1):] * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)
    split = split_forward(policy, kw, labels, mask.size(1), rows_per_forward)
    (split.log_probs * mask).sum().backward()
    n = mask.size(0) // 2
    real = batch["attention_mask"].sum(dim=1)
    assert real[:n].max() < real[n:].max()  # the chosen half is cut shorter: the case the split is for
    for name in ("log_probs", "entropy", "mean_logits"):
        a, b = getattr(joint, name)[:, -mask.size(1):], getattr(split, name)
        assert b.shape == mask.shape
        torch.testing.assert_close(b * mask, a * mask, rtol=1e-5, atol=1e-5)
    assert torch.equal(split.is_top1 & mask.bool(), joint.is_top1[:, -mask.size(1):] & mask.bool())
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5)


def test_a_run_shorter_than_an_epoch_scores_the_reference_on_the_fly(tok, tmp_path):
    # 2 steps of 1 pair visit 2 of the 4 pairs: a frozen copy of the initial model scores them as they come,
    # which must train exactly as the precomputed reference does
    cfg = _cfg(batch_size=1)
    logs = []
    for pre in (None, True):
        trainer = _trainer(_model(tok), None, tok, PAIRS, cfg, tmp_path / str(pre), seed=5, max_steps=2,
                                     precompute_ref_log_probs=pre)
        if pre is None:
            assert trainer.args.precompute_ref_log_probs is False and trainer.ref_model is not None
            assert not any(p.requires_grad for p in trainer.ref_model.parameters())
        trainer.train()
        logs.append(training_log(trainer))
    for col in ("loss", "dpo_l_loss", "sft_loss", "rewards/margins"):
        assert logs[0][col].tolist() == pytest.approx(logs[1][col].tolist(), rel=1e-5, abs=1e-6)
    # a run of at least one epoch precomputes (no second model kept)
    full = _trainer(_model(tok), None, tok, PAIRS, cfg, tmp_path / "full", seed=5, max_steps=4)
    assert full.args.precompute_ref_log_probs is True and full.ref_model is None


def test_make_trainer_wires_config_and_tokenizes_plain_text(tmp_path):
    tok = _tokenizer(add_bos=True)
    # A chat template that would visibly change the prompt if TRL applied it (it must not)
    tok.chat_template = "SYSTEM {% for m in messages %}{{ m['content'] }}{% endfor %}"
    pairs = PAIRS.assign(prompt="<bos>" + PAIRS["prompt"])
    cfg = _cfg(lr=3e-4, epochs=2.0, grad_accum=2, warmup_ratio=0.25, beta=0.2, lam=0.5, eta=0.8,
               length_margin_sign=1)
    trainer = _trainer(_model(tok), _model(tok), tok, pairs, cfg, tmp_path, seed=11)
    a = trainer.args
    assert (a.learning_rate, a.num_train_epochs, a.gradient_accumulation_steps, a.warmup_steps) == (3e-4, 2.0, 2, 0.25)
    assert (a.beta, a.length_lambda, a.sft_eta, a.length_margin_sign) == (0.2, 0.5, 0.8, 1)
    assert (a.per_device_train_batch_size, a.max_length, a.seed, a.bf16, a.gradient_checkpointing) == (
        4, 256, 11, False, False)
    assert a.save_strategy == "no" and a.report_to == [] and a.logging_steps == 1
    assert a.dataloader_num_workers == 0 and a.precompute_ref_log_probs is False
    row = trainer.train_dataset[0]
    # One BOS (the prompt's own), the prompt text tokenized verbatim, completions + EOS
    assert row["prompt_ids"] == tok(pairs["prompt"][0], add_special_tokens=False)["input_ids"]
    assert row["prompt_ids"].count(tok.bos_token_id) == 1
    assert row["chosen_ids"] == tok(pairs["chosen"][0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["rejected_ids"][-1] == tok.eos_token_id and row["rejected_ids"][:-1] == tok(
        pairs["rejected"][0], add_special_tokens=False)["input_ids"]


def test_evaluate_logs_dpo_l_metrics(tok, tmp_path):
    trainer = _trainer(_model(tok), None, tok, PAIRS, _cfg(), tmp_path, seed=0, eval_pairs=PAIRS)
    metrics = trainer.evaluate()
    lw, ll = _lengths(tok)
    assert metrics["eval_dpo_l_loss"] == pytest.approx(torch.log((lw + ll) / lw).mean().item(), rel=1e-5)
    assert metrics["eval_length_margin"] == pytest.approx(-torch.log(ll / lw).mean().item(), rel=1e-5)


def test_truncation_warns(tok, tmp_path):
    with pytest.warns(UserWarning, match="exceed max_length=40"):
        _trainer(_model(tok), _model(tok), tok, PAIRS, _cfg(max_length=40), tmp_path, seed=0)


@pytest.mark.parametrize("kw, msg", [
    ({"length_margin_sign": 0}, "length_margin_sign"),
    ({"length_margin_sign": True}, "length_margin_sign"),
    ({"sft_eta": 1.5}, "sft_eta"),
    ({"length_lambda": -1.0}, "length_lambda"),
    ({"beta": 0.0}, "beta"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.5, 0.5]}, "loss_type"),
    ({"ld_alpha": 0.5}, "ld_alpha"),
])
def test_config_rejects_bad_values(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        DPOLConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                   **checkpointing_kwargs(False, DPOConfig), **kw)


def test_bad_inputs_raise(tok, tmp_path):
    with pytest.raises(ValueError, match="lacks column"):
        pairs_to_dataset(PAIRS.drop(columns="rejected"), tok)
    with pytest.raises(ValueError, match="empty"):
        pairs_to_dataset(PAIRS.iloc[:0], tok)
    with pytest.raises(ValueError, match="'chosen' must hold non-empty strings"):
        pairs_to_dataset(PAIRS.assign(chosen=[None, "x", "y", "z"]), tok)
    with pytest.raises(ValueError, match="precompute"):
        _trainer(_model(tok), None, tok, PAIRS, _cfg(), tmp_path, seed=0, precompute_ref_log_probs=False)
    with pytest.raises(ValueError, match="warmup_ratio"):
        _trainer(_model(tok), None, tok, PAIRS, _cfg(warmup_ratio=1.0), tmp_path, seed=0)
    with pytest.raises(TypeError, match="DPOLConfig"):
        DPOLTrainer(_model(tok), _model(tok), args=DPOConfig(**_common_args(tmp_path)),
                    train_dataset=pairs_to_dataset(PAIRS, tok), processing_class=tok)


def _share_moved(tok, tmp_path, model) -> float:
    """Train 4 steps with the GPU settings; the share of the transformer layers' weights that changed."""
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    cfg = _cfg(lr=5e-6, bf16=True, gradient_checkpointing=True, batch_size=2)
    trainer = _trainer(model, None, tok, PAIRS, cfg, tmp_path, seed=0, max_steps=4, device="cpu")
    assert trainer.args.bf16
    trainer.train()
    assert trainer.model.is_gradient_checkpointing  # the trainer turns it on when training starts
    # the layers only: embedding rows of characters no pair uses get no gradient in any precision
    layers = [(n, p) for n, p in trainer.model.named_parameters() if ".layers." in n]
    moved = sum((p.detach().float() != before[n]).sum().item() for n, p in layers)
    return moved / sum(p.numel() for _, p in layers)


def test_bf16_training_keeps_fp32_master_weights_that_move(tok, tmp_path, monkeypatch):
    """The GPU settings (bf16 weights as loaded, bf16 mixed precision, gradient checkpointing, the paper's lr 5e-6)
    run on CPU: the optimizer updates fp32 master weights and nearly all of them move; without them most do not."""
    from tsq_utils.method import dpo_l

    model = _model(tok, noise=0.05).to(torch.bfloat16)
    share = _share_moved(tok, tmp_path / "fp32", model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert share > 0.95, share
    monkeypatch.setattr(dpo_l.build, "master_weights_fp32", lambda m: m)  # the old behaviour: bf16 weights
    bf16_share = _share_moved(tok, tmp_path / "bf16", _model(tok, noise=0.05).to(torch.bfloat16))
    assert bf16_share < 0.5, bf16_share


def test_master_weights_fp32_leaves_fp32_models_alone(tok):
    model = _model(tok)
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert master_weights_fp32(model) is model and [p.data_ptr() for p in model.parameters()] == ptrs
    half = master_weights_fp32(_model(tok).to(torch.bfloat16))
    assert {p.dtype for p in half.parameters()} == {torch.float32}


def test_global_batch_and_checkpoint_settings():
    cfg = _cfg(batch_size=1, grad_accum=16)
    assert global_batch(cfg) == 16 and checkpoint_settings(cfg) == {"save_strategy": "no"}
    cfg.num_processes, cfg.save_steps = 8, 25  # the keys of the scale-out profiles
    assert global_batch(cfg) == 128
    assert checkpoint_settings(cfg) == {"save_strategy": "steps", "save_steps": 25, "save_total_limit": 2,
                                        "save_only_model": False}


class _Crash(RuntimeError):
    pass


def test_an_interrupted_training_resumes_from_its_last_checkpoint(tok, tmp_path, monkeypatch):
    """save_steps checkpoints; a rerun of the same training resumes at the last one and ends with the same weights
    as an uninterrupted run (optimizer, scheduler and data order restored); other settings start afresh."""
    from transformers import TrainerCallback

    from tsq_utils.method import dpo_l

    cfg = _cfg(batch_size=2, lr=1e-2)
    cfg.save_steps = 1
    straight = _model(tok)
    log_straight = _train_and_save(straight, tok, PAIRS, cfg, tmp_path / "straight", seed=4, max_steps=4)

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise _Crash("killed after checkpoint 2")

    real = dpo_l.make_dpo_l_trainer  # train_and_save's own trainer, with a callback that crashes after a checkpoint
    monkeypatch.setattr(dpo_l.train, "make_dpo_l_trainer",
                        lambda *a: real(*a[:-1], dataclasses.replace(a[-1], callbacks=[CrashAfterSave()])))
    with pytest.raises(_Crash):
        _train_and_save(_model(tok), tok, PAIRS, cfg, tmp_path / "resumed", seed=4, max_steps=4)
    scratch = tmp_path / "resumed" / ".trainer"
    assert dpo_l.last_checkpoint(scratch).endswith("checkpoint-2")
    assert not (tmp_path / "resumed" / "model").exists()
    monkeypatch.setattr(dpo_l.train, "make_dpo_l_trainer", real)
    resumed = _model(tok)
    log_resumed = _train_and_save(resumed, tok, PAIRS, cfg, tmp_path / "resumed", seed=4, max_steps=4)
    assert list(log_resumed.index) == [1, 2, 3, 4]
    assert log_resumed["loss"].tolist() == pytest.approx(log_straight["loss"].tolist(), rel=1e-5)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not scratch.exists() and (tmp_path / "resumed" / "model" / "model.safetensors").is_file()
    # a checkpoint of other settings is not resumed: it is cleared and the run starts at step 1
    scratch.mkdir()
    (scratch / "run_fingerprint.txt").write_text("another run\n")
    (scratch / "checkpoint-3").mkdir()
    assert dpo_l._resume_point(scratch, "this run") is None and not (scratch / "checkpoint-3").exists()


def test_quiet_training_is_the_same_training(tok, tmp_path, capsys):
    """train_and_save(progress=False), as the ablation rows train: nothing printed per step (no bar, no log lines),
    and the very same log and weights as the notebook's training with its progress bar."""
    from safetensors.torch import load_file


    cfg = _cfg(batch_size=2, lr=1e-2)
    capsys.readouterr()
    loud = _train_and_save(_model(tok), tok, PAIRS, cfg, tmp_path / "loud", seed=4, max_steps=3)
    shown = capsys.readouterr()
    quiet = _train_and_save(_model(tok), tok, PAIRS, cfg, tmp_path / "quiet", seed=4, max_steps=3, progress=False)
    out = capsys.readouterr()
    assert "| 3/3 [" in shown.err  # the trainer's bar over 3 optimizer steps (other libraries' bars are not its)
    assert "| 3/3 [" not in out.err and "'loss'" not in out.out + out.err  # neither the bar nor a printed log line
    per_step = [c for c in loud.columns if "runtime" not in c and "per_second" not in c]
    pd.testing.assert_frame_equal(quiet[per_step], loud[per_step])
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("loud", "quiet"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- issue 23: the SFT term per token whatever the accumulation; the saved precision; DeepSpeed set-up -------------

PAIRS8 = pd.concat([PAIRS, PAIRS.assign(chosen=PAIRS["chosen"] + "\n", rejected=PAIRS["rejected"] + " ok")],
                   ignore_index=True)


def _step_gradient(tok, tmp_path, batch_size: int, grad_accum: int, eta: float) -> tuple[dict, float]:
    """One optimizer step's accumulated gradient over all 8 pairs, as the Trainer's loop computes it."""
    cfg = _cfg(batch_size=batch_size, grad_accum=grad_accum, eta=eta)
    trainer = _trainer(_model(tok, noise=0.3), _model(tok), tok, PAIRS8, cfg, tmp_path, seed=0, max_steps=1)
    model = trainer.model
    model.train()
    batches, n_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), grad_accum, trainer.args.device)
    assert len(batches) == grad_accum and sum(b["input_ids"].size(0) for b in batches) == 16
    trainer.current_gradient_accumulation_steps = grad_accum
    total = sum(trainer.training_step(model, b, n_items).item() for b in batches)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, total


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sft_term_is_one_token_mean_whatever_the_accumulation(tok, tmp_path, eta):
    """1 x 8 and 2 x 4 (batch x accumulation) give one step the same loss and gradient: that of the closed form
    η·mean_pairs DPO-L + (1−η)·(NLL summed over every chosen token of the 8 pairs / their token count)."""
    g1, loss1 = _step_gradient(tok, tmp_path / "a", 8, 1, eta)
    g2, loss2 = _step_gradient(tok, tmp_path / "b", 4, 2, eta)
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6)
    # the closed form, by autograd on the whole batch
    policy, ref = _model(tok, noise=0.3), _model(tok)
    trainer = _dpol(tok, tmp_path / "c", policy, ref, PAIRS8, sft_eta=eta)
    batch = _batch(trainer)
    pol = (_logps_with_grad(policy, batch))
    rf = _token_logps(ref, batch)
    c, r = pol.sum(1).chunk(2)
    rc, rr = rf.sum(1).chunk(2)
    lw, ll = _lengths(tok, PAIRS8)
    margin = (-1 * torch.log(ll / lw)).float()
    dpo = -F.logsigmoid(0.1 * ((c - rc) - (r - rr)) + margin).mean()
    chosen_mask = batch["completion_mask"][:, 1:].chunk(2)[0].bool()
    sft = -pol.chunk(2)[0][chosen_mask].sum() / chosen_mask.sum()
    closed = eta * dpo + (1 - eta) * sft
    closed.backward()
    assert loss1 == pytest.approx(closed.item(), rel=1e-5)
    for name, p in policy.named_parameters():
        if name in g1:
            torch.testing.assert_close(g1[name], p.grad, rtol=1e-4, atol=1e-6)


def _logps_with_grad(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logps * batch["completion_mask"][:, 1:]


def test_saved_model_keeps_the_precision_it_trained_in(tok, tmp_path):
    """bf16-loaded weights train as fp32 master weights at the paper's lr 5e-6; the saved file holds those fp32
    weights exactly, so updates below bf16's rounding step reach the saved model (the old cast back to bf16 kept
    under half of them)."""
    from safetensors.torch import load_file


    base = _model(tok, noise=0.05).to(torch.bfloat16)
    before = {n: p.detach().float().clone() for n, p in base.named_parameters()}
    cfg = _cfg(lr=5e-6, bf16=True, batch_size=2)
    _train_and_save(base, tok, PAIRS, cfg, tmp_path, seed=0, max_steps=4, device="cpu", progress=False)
    saved = load_file(tmp_path / "model" / "model.safetensors")
    layers = [n for n in saved if ".layers." in n]
    assert {saved[n].dtype for n in saved} == {torch.float32}
    for n, p in base.named_parameters():  # the in-memory trained weights, bit for bit
        assert torch.equal(saved[n], p.detach()), n
    moved = sum((saved[n] != before[n]).sum().item() for n in layers) / sum(saved[n].numel() for n in layers)
    moved_bf16 = sum((saved[n].to(torch.bfloat16).float() != before[n]).sum().item() for n in layers) / sum(
        saved[n].numel() for n in layers)
    assert moved > 0.95 and moved_bf16 < 0.5, (moved, moved_bf16)


def test_generated_deepspeed_configs_run_bf16_with_fp32_gradient_accumulation(monkeypatch):
    """The DeepSpeed config accelerate builds from configs/accelerate/zero{2,3}.yaml: bf16 on, gradients accumulated
    in fp32, ZeRO-3 built under zero.Init (zero3_init_flag), fp32 master weights saved (not the bf16 model)."""
    import yaml
    from accelerate.utils import DeepSpeedPlugin

    from tsq_utils.method import dpo_l

    for name in ("zero2", "zero3"):
        raw = yaml.safe_load(dpo_l.accelerate_config_file(name).read_text())
        ds = raw["deepspeed_config"]
        path = dpo_l.REPO_CONFIGS / Path(ds["deepspeed_config_file"]).name
        assert path.is_file() and raw["mixed_precision"] == "bf16"
        plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero3_init_flag=ds["zero3_init_flag"])
        plugin.set_mixed_precision(raw["mixed_precision"])  # what accelerate does with the yaml's mixed_precision
        conf = plugin.deepspeed_config
        assert conf["bf16"]["enabled"] is True and conf["fp16"]["enabled"] is False
        assert conf["data_types"]["grad_accum_dtype"] == "fp32"
        assert conf["zero_optimization"]["stage"] == int(name[-1])
        assert plugin.zero3_init_flag is (name == "zero3")
    # the launcher passes the JSON by absolute path (the yaml's is relative to the repository root)
    cfg = _cfg(batch_size=1, grad_accum=16)
    cfg.num_processes, cfg.accelerate_config = 8, "zero3"
    cmd = dpo_l.launch_command(Path("/tmp/job.json"), cfg, "cuda")
    assert cmd[cmd.index("--deepspeed_config_file") + 1] == str(dpo_l.REPO_CONFIGS / "ds_zero3.json")


@pytest.mark.parametrize("deepspeed", [True, False])
def test_train_entry_builds_the_training_arguments_before_loading_the_weights(tmp_path, monkeypatch, deepspeed):
    """ZeRO-3's zero.Init applies to from_pretrained only when the DeepSpeed config is registered first (by building
    the training arguments); under DeepSpeed the weights load in bf16, without it (bf16 autocast) in fp32."""
    from tsq_utils.method import dpo_l, train_entry

    events = []

    class Stop(Exception):
        pass

    def fake_args(*a, **k):
        events.append(("args", dpo_l.deepspeed_enabled()))
        return object()

    def fake_load(*a, dtype=None, **k):
        events.append(("load", dtype))
        raise Stop

    import transformers

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true" if deepspeed else "false")
    monkeypatch.setattr(dpo_l, "training_args", fake_args)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _tokenizer())
    PAIRS.to_parquet(tmp_path / "pairs.parquet")
    job = {"model": "x", "tokenizer": "x", "dtype": "bfloat16", "training": {"bf16": True}, "seed": 0,
           "max_steps": None, "device": "cuda", "pairs": str(tmp_path / "pairs.parquet"), "stage_dir": str(tmp_path),
           "model_subdir": "model", "log": str(tmp_path / "log.parquet")}
    with pytest.raises(Stop):
        train_entry.run_job(job)
    assert events == [("args", deepspeed), ("load", torch.bfloat16 if deepspeed else torch.float32)]


def test_reference_cache_is_reused_across_trainings(tok, tmp_path):
    """reference_log_probs scores a pairs table once into a cache folder; a later training (one epoch) of the same
    base model on the same pairs reads it (no scoring pass) and trains exactly as without the cache; other pairs or
    other weights miss."""
    from tsq_utils.method import dpo_l

    cache = tmp_path / "refcache"
    cfg = _cfg(batch_size=2)
    ref = dpo_l.reference_log_probs(_model(tok), tok, PAIRS, cfg, cache, device="cpu")
    assert len(ref) == len(PAIRS) and len(list(cache.glob("*.safetensors"))) == 1
    plain = _trainer(_model(tok), None, tok, PAIRS, cfg, tmp_path / "a", seed=1)
    assert plain.args.precompute_ref_log_probs and plain.ref_cache_hit is None
    torch.testing.assert_close(torch.tensor(plain.train_dataset["ref_chosen_logps"]),
                               torch.tensor(ref["ref_chosen_logps"].tolist()), rtol=1e-5, atol=1e-5)
    cached = _trainer(_model(tok), None, tok, PAIRS, cfg, tmp_path / "b", seed=1, ref_cache=str(cache))
    assert cached.ref_cache_hit is True and cached.ref_model is None
    plain.train()
    cached.train()
    assert training_log(cached)["loss"].tolist() == training_log(plain)["loss"].tolist()
    other = _trainer(_model(tok), None, tok, PAIRS.iloc[:3], cfg, tmp_path / "c", seed=1,
                               ref_cache=str(cache))
    assert other.ref_cache_hit is False and len(list(cache.glob("*.safetensors"))) == 2
    moved = _trainer(_model(tok, noise=0.1), None, tok, PAIRS, cfg, tmp_path / "d", seed=1,
                               ref_cache=str(cache))
    assert moved.ref_cache_hit is False  # other weights: another key


def test_short_runs_share_reference_batches(tok, tmp_path):
    """Runs shorter than an epoch (notebook 06's rows) score the batches they visit on the fly; with a ref_cache,
    a later run that draws the same batches (same pairs, same seed, another objective) reads them and trains bit for
    bit as it would have without the cache; another seed draws other batches."""
    cache = tmp_path / "refcache"
    runs = {}
    for name, eta, seed, rc in [("plain", 0.5, 1, None), ("cold", 0.5, 1, cache), ("warm", 0.8, 1, cache),
                                ("warm_plain", 0.8, 1, None), ("seed2", 0.5, 2, cache)]:
        cfg = _cfg(batch_size=1, eta=eta)
        trainer = _trainer(_model(tok), None, tok, PAIRS, cfg, tmp_path / name, seed=seed, max_steps=2,
                                     ref_cache=None if rc is None else str(rc))
        assert trainer.ref_model is not None and not trainer.args.precompute_ref_log_probs
        trainer.train()
        runs[name] = (trainer, training_log(trainer))
    assert runs["cold"][0].ref_batch_hits == 0 and runs["warm"][0].ref_batch_hits == 2
    assert len(list((cache / "batches").glob("*.safetensors"))) >= 2
    for a, b in (("plain", "cold"), ("warm_plain", "warm")):
        pd.testing.assert_frame_equal(runs[a][1].drop(columns=[c for c in runs[a][1] if "runtime" in c or
                                                               "per_second" in c]),
                                      runs[b][1].drop(columns=[c for c in runs[b][1] if "runtime" in c or
                                                               "per_second" in c]))
        for pa, pb in zip(runs[a][0].model.parameters(), runs[b][0].model.parameters()):
            assert torch.equal(pa, pb)
    assert runs["seed2"][0].ref_batch_hits < 2


def test_precompute_decision_counts_every_process():
    from tsq_utils.method.dpo_l.build import _shorter_than_an_epoch

    cfg = _cfg(batch_size=4)
    assert _shorter_than_an_epoch(cfg, 2, 16)
    cfg.num_processes = 2  # 2 steps x 4 pairs x 2 processes visit all 16 pairs: precompute, no second model
    assert not _shorter_than_an_epoch(cfg, 2, 16) and not _shorter_than_an_epoch(cfg, None, 16)


def test_deepspeed_save_writes_the_fp32_master_weights(tok, tmp_path, monkeypatch):
    """Under DeepSpeed the module holds bf16 weights and the optimizer the fp32 masters: save_trained gathers and
    writes the masters (a stand-in for deepspeed.utils.safe_get_full_fp32_param; DeepSpeed is not installed here)."""
    import sys
    import types

    from safetensors.torch import load_file

    from tsq_utils.method import dpo_l

    masters = _model(tok, noise=0.05)
    trainer = _trainer(_model(tok, noise=0.05).to(torch.bfloat16), _model(tok), tok, PAIRS, _cfg(),
                                 tmp_path / "t", seed=0)
    trainer.model.to(torch.bfloat16)  # DeepSpeed's bf16 section: the module in bf16
    by_id = {id(p): m.detach() for p, m in zip(trainer.model.parameters(), masters.parameters())}
    fake = types.ModuleType("deepspeed.utils")
    fake.safe_get_full_fp32_param = lambda p: by_id[id(p)].clone()
    import importlib.machinery

    for name, mod in (("deepspeed", types.ModuleType("deepspeed")), ("deepspeed.utils", fake)):
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    dpo_l.save_trained(trainer, tok, tmp_path / "model")
    saved = load_file(tmp_path / "model" / "model.safetensors")
    for name, p in masters.named_parameters():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], p.detach()), name
