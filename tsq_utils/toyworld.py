"""The toy reasoning world: chain-arithmetic problems, an overthinking teacher, the oracle, tokenizer and tiny reasoner."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .config import PretrainConfig, ToyWorldConfig

LABELS = "abcdefgh"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
PAD, UNK = "<pad>", "<unk>"
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "\n{{ m['content'] }}" + END + "\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "\n" + THINK_OPEN + "\n{% endif %}"
)
STEP_SEP = "\n\n"


# --------------------------------------------------------------------------- task


@dataclass
class Term:
    label: str
    op: str  # "" for the starting value, else "+" or "-"
    value: int

    def text(self) -> str:
        """The term as written in the question and step headers, e.g. 'b+6'."""
        return f"{self.label}{self.op}{self.value}"


@dataclass
class ToyProblem:
    problem_id: str
    k: int
    terms: list[Term]

    @property
    def question(self) -> str:
        """The question line, e.g. 'Q:a5,b+6,c-3'."""
        return "Q:" + ",".join(t.text() for t in self.terms)

    def totals(self) -> list[int]:
        """The running totals after each term."""
        out, tot = [], 0
        for t in self.terms:
            tot = t.value if not t.op else (tot + t.value if t.op == "+" else tot - t.value)
            out.append(tot)
        return out

    @property
    def answer(self) -> int:
        """The final total."""
        return self.totals()[-1]


def make_problem(rng: random.Random, k: int, max_value: int = 49, problem_id: str = "") -> ToyProblem:
    """A random chain of k terms whose running totals stay within [0, max_value]."""
    if not 2 <= k <= len(LABELS):
        raise ValueError(f"k must be in 2..{len(LABELS)}, got {k}")
    start = rng.randint(1, 9) if rng.random() < 0.5 else rng.randint(1, max_value)
    terms, tot = [Term("a", "", start)], start
    for i in range(1, k):
        ops: list[str] = []
        while not ops:  # below max_value 17 some operands fit neither way (e.g. 9 from 4 with max 9): draw again
            v = rng.randint(1, 9)
            ops = [o for o in "+-" if 0 <= (tot + v if o == "+" else tot - v) <= max_value]
        op = rng.choice(ops)
        tot = tot + v if op == "+" else tot - v
        terms.append(Term(LABELS[i], op, v))
    return ToyProblem(problem_id or f"toy-{k}-{rng.getrandbits(32):08x}", k, terms)


def make_problems(n: int, seed: int, k_min: int = 2, k_max: int = 8, max_value: int = 49, split: str = "train") -> list[ToyProblem]:
    """n problems with k spread evenly over k_min..k_max, seeded; ids encode the split."""
    if k_min > k_max:
        raise ValueError(f"k_min ({k_min}) exceeds k_max ({k_max})")
    rng = random.Random(f"{split}:{seed}")
    ks = [k_min + i % (k_max - k_min + 1) for i in range(n)]
    return [make_problem(rng, k, max_value, f"{split}-{i:05d}-k{k}") for i, k in enumerate(ks)]


# --------------------------------------------------------------------------- teacher traces


def _start_step(t: Term, verbose: bool) -> str:
    return f"We start with {t.text()}, so the total is {t.value}." if verbose else f"{t.text()}: {t.value}"


def _op_step(t: Term, prev: int, result: int, verbose: bool) -> str:
    eq = f"{prev}{t.op}{t.value}={result}"
    if verbose:
        return f"Next is {t.text()}. The total was {prev}, and {eq}, so now it is {result}."
    return f"{t.text()}: {eq}"


def _check_step(t: Term, prev: int, right: int, claimed: int) -> str:
    head = f"Wait, let me check {t.text()}: {prev}{t.op}{t.value}={right}."
    if claimed == right:
        return head + " Yes."
    return head + f" Not {claimed}, so the total is {right}."


def answer_text(answer: int) -> str:
    """The answer part that follows the thinking part."""
    return f"\n{THINK_CLOSE}\n\nThe answer is \\boxed{{{answer}}}."


def teacher_trace(problem: ToyProblem, rng: random.Random, cfg: ToyWorldConfig) -> str:
    """One teacher completion: concise (oracle-like) or overthinking with checks, slips and a review."""
    concise = rng.random() < cfg.p_concise
    totals = problem.totals()
    steps = []
    first = problem.terms[0]
    # The first step always shows the habit: an overthinking trace opens verbosely, so the model's first-token choice is
    # concise vs overthinking with odds p_concise : 1 - p_concise (greedy decoding then overthinks, as R1-style models do).
    steps.append(_start_step(first, verbose=not concise))
    for i, t in enumerate(problem.terms[1:], start=1):
        prev, right = totals[i - 1], totals[i]
        if concise:
            steps.append(_op_step(t, prev, right, verbose=False))
            continue
        verbose = rng.random() < cfg.p_verbose_step
        slip = rng.random() < cfg.p_slip
        claimed = right
        if slip:  # a slip is always caught by the check that follows it
            claimed = max(0, right + rng.choice([-2, -1, 1, 2]))
            claimed = right + 1 if claimed == right else claimed
        steps.append(_op_step(t, prev, claimed, verbose))
        if slip or rng.random() < cfg.p_check:
            steps.append(_check_step(t, prev, right, claimed))
    if not concise and rng.random() < cfg.p_review:
        expr = str(first.value) + "".join(f"{t.op}{t.value}" for t in problem.terms[1:])
        steps.append(f"Let me double-check the whole chain: {expr}={totals[-1]}.")
    return STEP_SEP.join(steps) + answer_text(totals[-1])


def oracle_trace(problem: ToyProblem) -> str:
    """The shortest correct trace of the toy world: every step concise, no checks, no review."""
    totals = problem.totals()
    steps = [_start_step(problem.terms[0], False)]
    steps += [_op_step(t, totals[i - 1], totals[i], False) for i, t in enumerate(problem.terms[1:], start=1)]
    return STEP_SEP.join(steps) + answer_text(totals[-1])


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(cfg: ToyWorldConfig, vocab_size: int, n_docs: int, seed: int):
    """Train a byte-level BPE on teacher traces and wrap it as a transformers fast tokenizer with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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


def prompt_for(question: str, tokenizer) -> str:
    """The chat-formatted prompt text (ends with '<think>\\n') for a question."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------- model


def model_config(tokenizer, cfg: PretrainConfig):
    """The Llama config of the toy reasoner (a Llama type avoids Qwen2's tokenizer swap)."""
    from transformers import LlamaConfig

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
    from transformers import LlamaForCausalLM

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


def _batches(tokenizer, cfg: ToyWorldConfig, pcfg: PretrainConfig, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
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


def pretrain(model, tokenizer, cfg: ToyWorldConfig, pcfg: PretrainConfig, seed: int, eval_every: int = 0,
             eval_fn=None, progress: bool = True, checkpoint_fn=None) -> PretrainLog:
    """Train the toy reasoner from scratch on fresh teacher traces until pcfg.n_tokens tokens are seen."""
    from tqdm.auto import tqdm

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
        if eval_every and eval_fn is not None and step % eval_every == 0:
            model.eval()
            res = eval_fn(model)
            res.update(step=step, tokens=seen)
            log.evals.append(res)
            bar.write(json.dumps(res))
            if checkpoint_fn is not None:
                checkpoint_fn(model, step)
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
    from .artifacts import atomic_dir

    path = Path(path)
    # Unique temp/old names (atomic_dir): two processes saving at once both succeed, the last one wins.
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "toy_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return path


def load_reasoner(path: str | Path, device: str = "cpu"):
    """Load a saved toy reasoner (safetensors only) and its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no toy reasoner at {path}: run notebooks/00_base_model.ipynb first")
    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, use_safetensors=True).to(device)
    model.eval()
    return model, tok


def read_manifest(path: str | Path) -> dict:
    """The toy_manifest.json of a saved reasoner."""
    return json.loads((Path(path) / "toy_manifest.json").read_text())


def world_description(cfg: ToyWorldConfig) -> dict:
    """A plain description of the toy task, for manifests and the notebook."""
    return {
        "task": "chain arithmetic: Q:a<start>,b±v,c±v,... ; answer = final total",
        "k_range": [cfg.k_min, cfg.k_max],
        "values": f"start 1..{cfg.max_value}, operands 1..9, running totals in [0, {cfg.max_value}]",
        "teacher": {k: getattr(cfg, k) for k in ("p_concise", "p_verbose_step", "p_check", "p_slip", "p_review")},
    }


def seconds_since(t0: float) -> float:
    """Wall seconds since t0, rounded."""
    return round(time.time() - t0, 1)


def build_reasoner(profile, progress: bool = True, checkpoint_every: int = 0, checkpoint_dir: str | Path | None = None):
    """Train the tokenizer and the toy reasoner of a profile from its seed; return (model, tokenizer, manifest)."""
    from .config import set_threads, stage_seed

    t0 = time.time()
    seed = stage_seed(profile.seed, "base_model")
    threads = set_threads(profile.threads)
    tok = train_tokenizer(profile.toyworld, profile.pretrain.vocab_size, profile.pretrain.n_tokenizer_docs, seed)
    model = new_model(tok, profile.pretrain, seed)

    def _ckpt(m, step):
        save_reasoner(m, tok, Path(checkpoint_dir) / f"step{step:06d}", {"step": step})

    log = pretrain(
        model, tok, profile.toyworld, profile.pretrain, seed, progress=progress,
        eval_every=checkpoint_every if checkpoint_dir else 0,
        eval_fn=(lambda m: {}) if checkpoint_dir else None,
        checkpoint_fn=_ckpt if checkpoint_dir else None,
    )
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


def parse_question(question: str, problem_id: str = "") -> ToyProblem:
    """Rebuild a ToyProblem from its question line 'Q:a5,b+6,c-3'; ValueError if malformed."""
    import re

    if not question.startswith("Q:"):
        raise ValueError(f"not a toy question: {question!r}")
    parts = question[2:].split(",")
    if not 2 <= len(parts) <= len(LABELS):
        raise ValueError(f"a toy question has 2..{len(LABELS)} terms, got {len(parts)} in {question!r}")
    terms = []
    for i, part in enumerate(parts):
        m = re.fullmatch(r"([a-h])([+-]?)(\d+)", part)
        if not m or m.group(1) != LABELS[i] or (i == 0) != (m.group(2) == ""):
            raise ValueError(f"malformed term {part!r} in {question!r}")
        terms.append(Term(m.group(1), m.group(2), int(m.group(3))))
    return ToyProblem(problem_id, len(terms), terms)


def teacher_fingerprint(cfg: ToyWorldConfig, n: int = 200) -> str:
    """A hash of n teacher traces drawn with a fixed seed: it changes whenever the task or the teacher's habits change."""
    import hashlib

    rng = random.Random("fingerprint")
    h = hashlib.sha256()
    for _ in range(n):
        p = make_problem(rng, rng.randint(cfg.k_min, cfg.k_max), cfg.max_value)
        h.update((p.question + "\n" + teacher_trace(p, rng, cfg) + "\x00").encode())
    return h.hexdigest()


def record_heldout(model_dir: str | Path, checks: dict) -> None:
    """Add the held-out measurements (notebook 00's checks) to a saved reasoner's manifest, atomically."""
    from .artifacts import atomic_write_json

    path = Path(model_dir) / "toy_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["heldout"] = {k: checks[k] for k in ("heldout_problems", "greedy_accuracy", "greedy_tokens", "oracle_tokens",
                                                  "greedy_over_oracle", "sampled_accuracy", "sampled_responses", "mean_cv")}
    atomic_write_json(path, manifest)
