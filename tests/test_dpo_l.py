"""Tests for tsq_utils.method.dpo_l: DPO-L + SFT against closed forms and TRL's own losses, on a tiny random Llama."""

import math
import string

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
from tsq_utils.method.dpo_l import (
    DPOLConfig,
    DPOLTrainer,
    NonFiniteLossError,
    checkpoint_settings,
    global_batch,
    make_dpo_l_trainer,
    master_weights_fp32,
    pairs_to_dataset,
    training_log,
)

datasets.disable_progress_bars()

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
    trainer = make_dpo_l_trainer(model, None, tok, PAIRS, _cfg(), tmp_path, seed=3, max_steps=3)
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
    trainer = make_dpo_l_trainer(model, _model(tok), tok, PAIRS, _cfg(), tmp_path, seed=0, max_steps=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"train step 1 ") as err:
        trainer.train()
    assert err.value.step == 1 and err.value.details["policy_logps_finite"] is False
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


@torch.no_grad()
def test_split_forward_equals_the_joint_forward_on_real_tokens(tok, tmp_path):
    from tsq_utils.method.dpo_l import split_forward

    policy = _model(tok)
    batch = _batch(_dpol(tok, tmp_path, policy, _model(tok)))
    mask = batch["completion_mask"][:, 1:]
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    joint = policy(**kw, labels=labels, fused_lm_head=True)
    split = split_forward(policy, kw, labels, mask.size(1))
    n = mask.size(0) // 2
    real = batch["attention_mask"].sum(dim=1)
    assert real[:n].max() < real[n:].max()  # the chosen half is cut shorter: the case the split is for
    for name in ("log_probs", "entropy", "mean_logits"):
        a, b = getattr(joint, name)[:, -mask.size(1):], getattr(split, name)
        assert b.shape == mask.shape
        torch.testing.assert_close(b * mask, a * mask, rtol=1e-5, atol=1e-5)
    assert torch.equal(split.is_top1 & mask.bool(), joint.is_top1[:, -mask.size(1):] & mask.bool())


def test_a_run_shorter_than_an_epoch_scores_the_reference_on_the_fly(tok, tmp_path):
    # 2 steps of 1 pair visit 2 of the 4 pairs: a frozen copy of the initial model scores them as they come,
    # which must train exactly as the precomputed reference does
    cfg = _cfg(batch_size=1)
    logs = []
    for pre in (None, True):
        trainer = make_dpo_l_trainer(_model(tok), None, tok, PAIRS, cfg, tmp_path / str(pre), seed=5, max_steps=2,
                                     precompute_ref_log_probs=pre)
        if pre is None:
            assert trainer.args.precompute_ref_log_probs is False and trainer.ref_model is not None
            assert not any(p.requires_grad for p in trainer.ref_model.parameters())
        trainer.train()
        logs.append(training_log(trainer))
    for col in ("loss", "dpo_l_loss", "sft_loss", "rewards/margins"):
        assert logs[0][col].tolist() == pytest.approx(logs[1][col].tolist(), rel=1e-5, abs=1e-6)
    # a run of at least one epoch precomputes (no second model kept)
    full = make_dpo_l_trainer(_model(tok), None, tok, PAIRS, cfg, tmp_path / "full", seed=5, max_steps=4)
    assert full.args.precompute_ref_log_probs is True and full.ref_model is None


def test_make_trainer_wires_config_and_tokenizes_plain_text(tmp_path):
    tok = _tokenizer(add_bos=True)
    # A chat template that would visibly change the prompt if TRL applied it (it must not)
    tok.chat_template = "SYSTEM {% for m in messages %}{{ m['content'] }}{% endfor %}"
    pairs = PAIRS.assign(prompt="<bos>" + PAIRS["prompt"])
    cfg = _cfg(lr=3e-4, epochs=2.0, grad_accum=2, warmup_ratio=0.25, beta=0.2, lam=0.5, eta=0.8,
               length_margin_sign=1)
    trainer = make_dpo_l_trainer(_model(tok), _model(tok), tok, pairs, cfg, tmp_path, seed=11)
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
    trainer = make_dpo_l_trainer(_model(tok), None, tok, PAIRS, _cfg(), tmp_path, seed=0, eval_pairs=PAIRS)
    metrics = trainer.evaluate()
    lw, ll = _lengths(tok)
    assert metrics["eval_dpo_l_loss"] == pytest.approx(torch.log((lw + ll) / lw).mean().item(), rel=1e-5)
    assert metrics["eval_length_margin"] == pytest.approx(-torch.log(ll / lw).mean().item(), rel=1e-5)


def test_truncation_warns(tok, tmp_path):
    with pytest.warns(UserWarning, match="exceed max_length=40"):
        make_dpo_l_trainer(_model(tok), _model(tok), tok, PAIRS, _cfg(max_length=40), tmp_path, seed=0)


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
        make_dpo_l_trainer(_model(tok), None, tok, PAIRS, _cfg(), tmp_path, seed=0, precompute_ref_log_probs=False)
    with pytest.raises(ValueError, match="warmup_ratio"):
        make_dpo_l_trainer(_model(tok), None, tok, PAIRS, _cfg(warmup_ratio=1.0), tmp_path, seed=0)
    with pytest.raises(TypeError, match="DPOLConfig"):
        DPOLTrainer(_model(tok), _model(tok), args=DPOConfig(**_common_args(tmp_path)),
                    train_dataset=pairs_to_dataset(PAIRS, tok), processing_class=tok)


def _share_moved(tok, tmp_path, model) -> float:
    """Train 4 steps with the GPU settings; the share of the transformer layers' weights that changed."""
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    cfg = _cfg(lr=5e-6, bf16=True, gradient_checkpointing=True, batch_size=2)
    trainer = make_dpo_l_trainer(model, None, tok, PAIRS, cfg, tmp_path, seed=0, max_steps=4, device="cpu")
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
    monkeypatch.setattr(dpo_l, "master_weights_fp32", lambda m: m)  # the old behaviour: bf16 weights
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
    log_straight = dpo_l.train_and_save(straight, tok, PAIRS, cfg, tmp_path / "straight", seed=4, max_steps=4)

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise _Crash("killed after checkpoint 2")

    real = dpo_l.make_dpo_l_trainer
    monkeypatch.setattr(dpo_l, "make_dpo_l_trainer", lambda *a, **k: real(*a, callbacks=[CrashAfterSave()], **k))
    with pytest.raises(_Crash):
        dpo_l.train_and_save(_model(tok), tok, PAIRS, cfg, tmp_path / "resumed", seed=4, max_steps=4)
    scratch = tmp_path / "resumed" / ".trainer"
    assert dpo_l.last_checkpoint(scratch).endswith("checkpoint-2")
    assert not (tmp_path / "resumed" / "model").exists()
    monkeypatch.setattr(dpo_l, "make_dpo_l_trainer", real)
    resumed = _model(tok)
    log_resumed = dpo_l.train_and_save(resumed, tok, PAIRS, cfg, tmp_path / "resumed", seed=4, max_steps=4)
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

    from tsq_utils.method import dpo_l

    cfg = _cfg(batch_size=2, lr=1e-2)
    capsys.readouterr()
    loud = dpo_l.train_and_save(_model(tok), tok, PAIRS, cfg, tmp_path / "loud", seed=4, max_steps=3)
    shown = capsys.readouterr()
    quiet = dpo_l.train_and_save(_model(tok), tok, PAIRS, cfg, tmp_path / "quiet", seed=4, max_steps=3, progress=False)
    out = capsys.readouterr()
    assert "| 3/3 [" in shown.err  # the trainer's bar over 3 optimizer steps (other libraries' bars are not its)
    assert "| 3/3 [" not in out.err and "'loss'" not in out.out + out.err  # neither the bar nor a printed log line
    per_step = [c for c in loud.columns if "runtime" not in c and "per_second" not in c]
    pd.testing.assert_frame_equal(quiet[per_step], loud[per_step])
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("loud", "quiet"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
