"""The toy reasoner: its tokenizer, its Llama config, pretraining on teacher traces, saving, loading and building it."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..core.artifacts import atomic_dir, atomic_write_json, check_safetensors
from ..core.config import (REPO_ROOT, PretrainConfig, Profile, ToyWorldConfig, resolve_device, set_threads,
                           stage_seed)
from ..core.pointer import CorruptStateError, write_pointer
from ..core.stage_paths import display_path
from ..task.format import THINK_CLOSE, THINK_OPEN
from ..task.toy import (ASSISTANT, CHAT_TEMPLATE, END, PAD, UNK, USER, ToyProblem, make_problem, prompt_for,
                        teacher_fingerprint, teacher_trace, world_description)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(cfg: ToyWorldConfig, vocab_size: int, n_docs: int, seed: int):
    """Train a byte-level BPE on teacher traces and wrap it as a transformers fast tokenizer with a chat template."""
    rng = random.Random(f"tok:{seed}")
    docs = []
    for i in range(n_docs):
        p = make_problem(rng, rng.randint(cfg.k_min, cfg.k_max), cfg.max_value)
        docs.append(p.question + "\n" + teacher_trace(p, rng, cfg))
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Blank lines are isolated first so that the step separator "\n\n" is one token of its own.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, END, UNK, USER, ASSISTANT]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=END, unk_token=UNK, bos_token=None,
        additional_special_tokens=[USER, ASSISTANT],
    )
    # <think> and </think> are ordinary added tokens: decoding with skip_special_tokens keeps them.
    fast.add_tokens([THINK_OPEN, THINK_CLOSE])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


# --------------------------------------------------------------------------- model


def model_config(tokenizer, cfg: PretrainConfig):
    """The Llama config of the toy reasoner (a Llama type avoids Qwen2's tokenizer swap)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def new_model(tokenizer, cfg: PretrainConfig, seed: int):
    """A freshly initialised toy reasoner."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(model_config(tokenizer, cfg))


def count_parameters(model) -> int:
    """Number of distinct trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- pretraining


def _doc_ids(p: ToyProblem, rng: random.Random, cfg: ToyWorldConfig, tokenizer) -> tuple[list[int], int]:
    """Token ids of prompt + teacher completion + eos, and the prompt length."""
    prompt = tokenizer(prompt_for(p.question, tokenizer), add_special_tokens=False)["input_ids"]
    comp = tokenizer(teacher_trace(p, rng, cfg), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + comp, len(prompt)


def _batches(tokenizer, cfg: ToyWorldConfig, pcfg: PretrainConfig,
             seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Endless length-bucketed batches (input_ids, labels, real tokens) of fresh teacher documents."""
    rng = random.Random(f"pretrain:{seed}")
    pad = tokenizer.pad_token_id
    while True:
        pool = []
        for _ in range(pcfg.batch_size * 8):
            p = make_problem(rng, rng.randint(cfg.k_min, cfg.k_max), cfg.max_value)
            ids, n_prompt = _doc_ids(p, rng, cfg, tokenizer)
            pool.append((ids[: pcfg.block_size], n_prompt))
        pool.sort(key=lambda x: len(x[0]))
        chunks = [pool[i : i + pcfg.batch_size] for i in range(0, len(pool), pcfg.batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            width = max(len(ids) for ids, _ in chunk)
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            y = torch.full((len(chunk), width), -100, dtype=torch.long)
            real = 0
            for r, (ids, n_prompt) in enumerate(chunk):
                x[r, : len(ids)] = torch.tensor(ids)
                # the loss covers the completion only: the question's numbers are random by design
                y[r, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
                real += len(ids)
            yield x, y, real


@dataclass
class PretrainLog:
    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Checkpoints:
    """What pretraining does every `every` steps (0: nothing): log eval_fn(model), a dict, then save_fn(model, step)."""

    every: int = 0
    eval_fn: Callable[[Any], dict] | None = None
    save_fn: Callable[[Any, int], None] | None = None


def pretrain(model, tokenizer, cfg: ToyWorldConfig, pcfg: PretrainConfig, seed: int, progress: bool = True,
             checkpoints: Checkpoints = Checkpoints()) -> PretrainLog:
    """Train the toy reasoner from scratch on fresh teacher traces until pcfg.n_tokens tokens are seen."""
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": pcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=pcfg.lr, betas=(0.9, 0.95),
    )
    avg_tokens = _estimate_doc_tokens(tokenizer, cfg) * pcfg.batch_size
    total_steps = max(1, math.ceil(pcfg.n_tokens / avg_tokens))
    warmup = max(1, int(pcfg.warmup_ratio * total_steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return pcfg.lr * (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return pcfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))

    log = PretrainLog()
    model.train()
    seen, step = 0, 0
    bar = tqdm(total=pcfg.n_tokens, unit="tok", unit_scale=True, disable=not progress, desc="pretrain")
    for x, y, real in _batches(tokenizer, cfg, pcfg, seed):
        if seen >= pcfg.n_tokens:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=x, attention_mask=(x != tokenizer.pad_token_id).long(), labels=y)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += real
        step += 1
        bar.update(real)
        if step % 10 == 0 or seen >= pcfg.n_tokens:
            log.steps.append(step)
            log.tokens.append(seen)
            log.loss.append(float(loss.item()))
            log.lr.append(lr_at(step))
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if checkpoints.every and checkpoints.eval_fn is not None and step % checkpoints.every == 0:
            model.eval()
            res = checkpoints.eval_fn(model)
            res.update(step=step, tokens=seen)
            log.evals.append(res)
            bar.write(json.dumps(res))
            if checkpoints.save_fn is not None:
                checkpoints.save_fn(model, step)
            model.train()
    bar.close()
    model.eval()
    return log


def _estimate_doc_tokens(tokenizer, cfg: ToyWorldConfig, n: int = 200) -> float:
    """Mean tokens of a teacher document (prompt + completion), to size the schedule."""
    rng = random.Random("estimate")
    tot = 0
    for _ in range(n):
        p = make_problem(rng, rng.randint(cfg.k_min, cfg.k_max), cfg.max_value)
        tot += len(_doc_ids(p, rng, cfg, tokenizer)[0])
    return tot / n


# --------------------------------------------------------------------------- saving and loading


def save_reasoner(model, tokenizer, path: str | Path, manifest: dict) -> Path:
    """Save model (safetensors), tokenizer and a manifest of how it was made into a folder, atomically."""
    path = Path(path)
    # Unique temp/old names (atomic_dir): two processes saving at once both succeed, the last one wins.
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "toy_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return path


def load_reasoner(path: str | Path, device: str = "cpu"):
    """Load a saved toy reasoner (safetensors only) and its tokenizer."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no toy reasoner at {path}: run notebooks/00_base_model.ipynb first")
    check_safetensors(path / "model.safetensors")  # a truncated copy names its file, not a bare SafetensorError
    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, use_safetensors=True).to(device)
    model.eval()
    return model, tok


def read_manifest(path: str | Path) -> dict:
    """The toy_manifest.json of a saved reasoner."""
    return json.loads((Path(path) / "toy_manifest.json").read_text())


def seconds_since(t0: float) -> float:
    """Wall seconds since t0, rounded."""
    return round(time.time() - t0, 1)


def build_reasoner(profile, progress: bool = True, checkpoint_every: int = 0, checkpoint_dir: str | Path | None = None):
    """Train the tokenizer and the toy reasoner of a profile from its seed; return (model, tokenizer, manifest)."""
    t0 = time.time()
    seed = stage_seed(profile.seed, "base_model")
    threads = set_threads(profile.threads)
    tok = train_tokenizer(profile.toyworld, profile.pretrain.vocab_size, profile.pretrain.n_tokenizer_docs, seed)
    model = new_model(tok, profile.pretrain, seed)

    def _ckpt(m, step):
        save_reasoner(m, tok, Path(checkpoint_dir) / f"step{step:06d}", {"step": step})

    checkpoints = Checkpoints(checkpoint_every, lambda m: {}, _ckpt) if checkpoint_dir else Checkpoints()
    log = pretrain(model, tok, profile.toyworld, profile.pretrain, seed, progress=progress, checkpoints=checkpoints)
    manifest = {
        "profile": profile.name,
        "seed": seed,
        "run_seed": profile.seed,
        "threads": threads,
        "toyworld": world_description(profile.toyworld),
        "toyworld_config": dict(vars(profile.toyworld)),
        "teacher_fingerprint": teacher_fingerprint(profile.toyworld),
        "pretrain_config": dict(vars(profile.pretrain)),
        "n_parameters": count_parameters(model),
        "vocab_size": len(tok),
        "tokens_seen": log.tokens[-1] if log.tokens else 0,
        "steps": log.steps[-1] if log.steps else 0,
        "final_loss": log.loss[-1] if log.loss else None,
        "wall_time_s": seconds_since(t0),
        "torch": torch.__version__,
        "loss_curve": {"tokens": log.tokens, "loss": log.loss},
    }
    return model, tok, manifest


def record_heldout(model_dir: str | Path, checks: dict) -> None:
    """Add the held-out measurements (notebook 00's checks) to a saved reasoner's manifest, atomically."""
    path = Path(model_dir) / "toy_manifest.json"
    manifest = json.loads(path.read_text())
    keys = ("heldout_problems", "greedy_accuracy", "greedy_tokens", "oracle_tokens", "greedy_over_oracle",
            "sampled_accuracy", "sampled_responses", "mean_cv")
    manifest["heldout"] = {k: checks[k] for k in keys}
    atomic_write_json(path, manifest)


# --------------------------------------------------------------------------- stage 00 for the toy reasoner


def toy_model_dir(profile: Profile, run_dir: Path) -> Path:
    """Where a profile's toy reasoner lives: the shipped folder, or the run folder when it is retrained."""
    if profile.pretrain.retrain:
        return run_dir / "base_model" / "model"
    return REPO_ROOT / profile.model.path


def prepare_toy(stage, progress: bool = True):
    """Stage 00 on a toy profile: train (retrain, ci) or load the toy reasoner and record it; (model, tok, manifest)."""
    profile = stage.profile
    path = toy_model_dir(profile, stage.run_dir)
    if profile.pretrain.retrain:
        reason = "force=True" if stage.force else _retrain_reason(path, profile)
        if reason:
            print(f"[base_model] training the toy reasoner: {reason}")
            model, tok, manifest = build_reasoner(profile, progress=progress)
            save_reasoner(model, tok, path, manifest)
    try:
        model, tok = load_reasoner(path, device=resolve_device(profile))
        info = read_manifest(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, JSON and tokenizer errors all mean a damaged folder
        fix = ("rerun notebooks/00_base_model.ipynb with -p force True to retrain it" if profile.pretrain.retrain
               else "restore the shipped reasoner (git checkout -- checkpoints/toy-reasoner) or retrain it "
               "(-p retrain True)")
        raise CorruptStateError(f"the toy reasoner in {path} cannot be loaded ({type(e).__name__}: {e}): {fix}") from e
    write_pointer(stage.dir, str(path), "toy")
    return model, tok, info


def _retrain_reason(path: Path, profile: Profile) -> str | None:
    """Why a retrained toy reasoner must be (re)built, or None when the saved one matches and loads."""
    if not (path / "model.safetensors").exists():
        return f"no model in {display_path(path)}"
    try:
        manifest = read_manifest_safe(path)
        if manifest.get("pretrain_config") != dict(vars(profile.pretrain)):
            return "pretrain settings changed"
        # the teacher's traces are what the reasoner learned: a changed teacher (or task) means a different reasoner
        if manifest.get("teacher_fingerprint") != teacher_fingerprint(profile.toyworld):
            return "the toy world's teacher changed"
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)  # reads every tensor: a truncated file fails here
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild it
        return f"the saved model in {display_path(path)} is damaged ({type(e).__name__}: {e})"
    return None


def read_manifest_safe(path: Path) -> dict:
    """The toy_manifest.json of a saved reasoner ({} when it is not a JSON object)."""
    m = read_manifest(path)
    return m if isinstance(m, dict) else {}
