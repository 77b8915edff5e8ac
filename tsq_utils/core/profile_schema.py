"""The profile's keys: one dataclass per section, each key a knob with its default, its range and why it exists.

This is the one definition of every key: docs/profiles.md is rendered from these dataclasses (core/profile_doc.py),
core/profile_loader.py checks a profile file against them, and tsq_utils.core.config re-exports them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_NO_DEFAULT = dataclasses.MISSING


def knob(default: Any = _NO_DEFAULT, *, help: str, lo: float | None = None, hi: float | None = None,
         choices: tuple | None = None, lo_open: bool = False, factory: Any = None) -> Any:
    """A profile field: its default, what it does and why (help), and its range (inclusive; lo_open excludes lo)
    or its allowed values. The help text is the field's one documentation; docs/profiles.md is rendered from it."""
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if default is _NO_DEFAULT:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """The base model every stage starts from: where it comes from and the precision it runs in."""

    source: str = knob("toy", choices=("toy", "hub"), help=(
        "toy: the toy reasoner of notebook 00 (trained here, CPU-sized); hub: a Hugging Face causal LM such as "
        "DeepSeek-R1-Distill-Qwen (the paper's models)."))
    path: str = knob("checkpoints/toy-reasoner", help=(
        "toy: the reasoner's folder relative to the repository (checkpoints/toy-reasoner ships with the repo, so the "
        "toy profile needs no training); hub: a hub id or a local path."))
    dtype: str = knob("float32", choices=("float32", "bfloat16", "float16"), help=(
        "The weights' precision for generation and KL scoring. The toy reasoner runs in float32 (CPU); the R1 models "
        "in bfloat16, their released dtype."))
    local_override: str = knob("", help=(
        "A local model folder that replaces the hub model (pre-downloaded copy, or a stand-in from "
        "tsq_utils.model.standin), so hub profiles can run offline and in tests. Empty: use path."))


@dataclass
class ToyWorldConfig:
    """The toy world (chain arithmetic): problem sizes and the teacher's habits that the toy reasoner learns, so
    that it overthinks the way R1-style models do and the method has something to compress."""

    k_min: int = knob(2, lo=2, hi=8, help=(
        "Fewest terms in a problem (difficulty k). Must not exceed k_max."))
    k_max: int = knob(8, lo=2, hi=8, help=(
        "Most terms in a problem. Problems are spread evenly over k_min..k_max, so the correctness rate p spreads "
        "over (0, 1) as adaptive selection needs."))
    max_value: int = knob(49, lo=9, hi=99, help=(
        "Largest running total (start 1..max_value, operands 1..9). Smaller worlds are easier for a tiny model "
        "(the ci profile uses 19)."))
    teacher: str = knob("local", choices=("local", "habit"), help=(
        "How the teacher writes. local: every step picks its own wording from `phrasings` and its own check, "
        "independently of the rest of the trace, and a slip that no check or review catches reaches the answer, so "
        "that depth matters and a step can be reworded without moving the rest (what selection and refinement act "
        "on). habit: the first world (one concise-or-overthinking coin per trace, every slip caught), kept to "
        "reproduce earlier runs."))
    phrasings: list = knob(factory=lambda: [0.15, 0.2, 0.25, 0.4], help=(
        "local teacher: the weights of the four phrasings of an operation step, terse (the oracle's step) to "
        "longest; every phrasing carries the same equation. Mostly long, so the reasoner overthinks."))
    p_verbose_start: float = knob(0.6, lo=0.0, hi=1.0, help=(
        "local teacher: chance that the opening step is spelled out verbosely."))
    p_concise: float = knob(0.25, lo=0.0, hi=1.0, help=(
        "habit teacher: share of traces written in the concise, oracle-like style; the rest overthink."))
    p_verbose_step: float = knob(0.75, lo=0.0, hi=1.0, help=(
        "habit teacher: in an overthinking trace, chance that a step is spelled out verbosely."))
    p_check: float = knob(0.4, lo=0.0, hi=1.0, help=(
        "Chance of a 'Wait, let me check' step after an operation step. local: a habit drawn per step regardless "
        "of slips, so a skipped check can let a slip through (the shortcut that is often right on short chains "
        "and often wrong on long ones); habit: after a correct step (a slip is always checked)."))
    p_slip: float = knob(0.15, lo=0.0, hi=1.0, help=(
        "Chance of an arithmetic slip in an operation step. local: a carry slip (the tens digit off by one) that "
        "carries into every later total unless a check or the review catches it; habit: a small error always "
        "caught by the check that follows."))
    p_review: float = knob(0.3, lo=0.0, hi=1.0, help=(
        "Chance of a closing review of the whole chain, which recomputes the answer (local: it catches a slip that "
        "got through; habit: redundant length)."))



@dataclass
class PretrainConfig:
    """Notebook 00's training of the toy reasoner from scratch on teacher traces (toy source only)."""

    retrain: bool = knob(False, help=(
        "True: notebook 00 trains the reasoner from scratch; False: it loads model.path, which the toy profile "
        "ships, so the pipeline does not spend the training time before its first stage."))
    hidden_size: int = knob(128, lo=16, hi=4096, help=(
        "Width of the toy transformer (Qwen2 architecture, so the same code paths serve the R1 models). Must be "
        "divisible by num_heads."))
    num_layers: int = knob(4, lo=1, hi=64, help="Transformer blocks of the toy reasoner.")
    num_heads: int = knob(4, lo=1, hi=64, help="Attention heads of the toy reasoner.")
    intermediate_size: int = knob(512, lo=16, hi=16384, help="MLP width of the toy reasoner (4 x hidden_size).")
    vocab_size: int = knob(512, lo=64, hi=65536, help=(
        "Size of the BPE vocabulary trained on teacher traces: the toy world's text needs few tokens."))
    block_size: int = knob(512, lo=32, hi=8192, help=(
        "Longest training sequence in tokens (a longer trace is cut)."))
    n_tokens: int = knob(10_000_000, lo=1000, hi=10**10, help=(
        "Training tokens (fresh teacher traces, never repeated): enough for the reasoner to learn the world and "
        "the teacher's habits, which the later stages then compress."))
    batch_size: int = knob(16, lo=1, hi=4096, help="Sequences per optimizer step.")
    lr: float = knob(3e-3, lo=1e-7, hi=1.0, help="Peak learning rate (warm-up, then cosine decay to 5% of it).")
    warmup_ratio: float = knob(0.02, lo=0.0, hi=0.5, help="Share of the steps spent warming the learning rate up.")
    weight_decay: float = knob(0.1, lo=0.0, hi=1.0, help="AdamW weight decay.")
    n_tokenizer_docs: int = knob(20000, lo=100, hi=10**7, help="Teacher traces the BPE tokenizer is trained on.")


@dataclass
class DataConfig:
    """Which problems the pipeline trains on and evaluates on, and where local copies of benchmarks are."""

    train: str = knob("toy", help=(
        "The task notebook 01 samples its training problems from: toy (the toy world) or a math benchmark "
        "(math_train, math500, gsm8k, ...; the names tsq_utils.task registers). Its task also brings the prompt and "
        "the grader that later stages use."))
    eval: list = knob(factory=lambda: ["toy"], help=(
        "The evaluation tasks of notebooks 05-07, each reported on its own (toy, math500, aime24, aime25, ...); "
        "on a hub profile 00 takes its worked example from the first."))
    n_train_problems: int = knob(400, lo=1, hi=10**7, help=(
        "Training problems (fewer than the set holds: a seeded random subset). On toy, spread evenly over k."))
    n_eval_problems: int = knob(400, lo=1, hi=10**7, help=(
        "Evaluation problems per benchmark (the first ones; a benchmark with fewer gives all of its)."))
    local_files: dict = knob(factory=dict, help=(
        "Benchmark name -> local JSONL file that replaces the hub dataset (relative paths: from the repository), "
        "for offline runs and tests."))
    local_dir: str = knob("", help=(
        "A folder of local benchmark copies under the file names of data.BENCHMARKS, used for every benchmark "
        "without a local_files entry (relative paths: from the repository). Empty: the hub."))


@dataclass
class SamplingConfig:
    """Notebook 01's sampling of N responses per training problem (and the generation backend of 00, 05 and 07)."""

    backend: str = knob("transformers", choices=("transformers", "vllm"), help=(
        "transformers runs anywhere (CPU included); vllm is far faster on a GPU and needs device cuda or auto."))
    n: int = knob(8, lo=1, hi=4096, help=(
        "N responses per problem: the correctness rate p = c/N that adaptive selection reads is resolved in steps "
        "of 1/N."))
    temperature: float = knob(1.0, lo=0.0, hi=5.0, help=(
        "Sampling temperature of the training responses; high enough that a problem gets both correct and wrong "
        "responses (the paper samples at 0.9)."))
    top_p: float = knob(1.0, lo=0.0, hi=1.0, lo_open=True, help="Nucleus sampling threshold (1: off).")
    max_new_tokens: int = knob(512, lo=1, hi=10**6, help=(
        "Longest response; a response cut there counts as not correct (unfinished)."))
    batch_size: int = knob(64, lo=1, hi=100000, help=(
        "Decode slots of the transformers backend (rows decoded together; a finished row's slot takes the next "
        "waiting row at once): larger is faster until memory runs out. With the toy world's engine "
        "(model/fast_decode.py) the samples do not depend on it."))
    gpu_memory_utilization: float = knob(0.85, lo=0.05, hi=1.0, help=(
        "vLLM only: the share of GPU memory the engine may take (weights + KV cache); the rest stays for the CUDA "
        "context and a transformers model in the same process."))
    tensor_parallel_size: int = knob(1, lo=1, hi=64, help="vLLM only: GPUs per engine (a model too big for one).")
    data_parallel_size: int = knob(1, lo=1, hi=64, help=(
        "vLLM only: engines side by side, each on tensor_parallel_size GPUs of its own; notebooks 01 and 05 shard "
        "their prompts over them and merge the results (the same samples as one engine: seeds are per request)."))
    max_model_len: int = knob(0, lo=0, hi=10**7, help=(
        "vLLM only: the engine's context length. 0 derives it: the longest generation asked for (sampling or "
        "evaluation max_new_tokens) plus room for the prompt. Set, it must exceed both."))


@dataclass
class SelectionConfig:
    """Notebook 02's adaptive reasoning-depth selection (TokenSqueeze §3.1): which correct responses become
    positives, paired with longer wrong ones."""

    variant: str = knob("q_dyn", choices=("shortest", "q_fix", "q_dyn", "q_dyn_extra"), help=(
        "The selection rule (tsq_utils.method.selection.REGISTRY, which must list the same names): q_dyn is the "
        "paper's q = alpha (1 - p); shortest, q_fix and q_dyn_extra are its ablations (Table 2)."))
    alpha: float = knob(0.2, lo=0.0, hi=1.0, help=(
        "alpha of q = alpha (1 - p): the share of the correct responses kept as positives on a hard problem "
        "(0 reduces q_dyn to shortest). The paper's Fig. 4 sweeps it; 0.2 is its best."))
    q_fix: float = knob(0.2, lo=0.0, hi=1.0, help="q_fix only: the fixed quantile, the same for every problem.")
    max_pairs: int = knob(64, lo=1, hi=100000, help=(
        "M: most pairs per problem (a seeded random subset beyond), so that problems with many responses do not "
        "dominate training."))
    extra_neg_ratio: float = knob(1.5, lo=1.0, hi=100.0, help=(
        "q_dyn_extra only: correct responses longer than this times the positive's length also count as "
        "rejected responses."))


@dataclass
class RefinementConfig:
    """Notebook 03's KL-constrained step refinement (TokenSqueeze §3.2): each step of a chosen response is replaced
    by the shortest candidate whose continuation stays within epsilon (KL) of the original's."""

    enabled: bool = knob(True, help="False passes the pairs through unrefined (the 'no refinement' ablation).")
    n_candidates: int = knob(16, lo=1, hi=4096, help=(
        "K: candidate rewrites sampled per step (the paper: 64); more find shorter steps at a linear cost."))
    window: int = knob(512, lo=1, hi=100000, help=(
        "L: tokens of the continuation the KL compares (the paper: 512)."))
    epsilon: float = knob(0.005, lo=0.0, hi=1e6, help=(
        "The KL threshold a candidate must stay within to replace a step (the paper: 0.005). Larger accepts more "
        "and shorter rewrites."))
    kl_reduction: str = knob("mean", choices=("mean", "sum"), help=(
        "How the KL over the window is reduced: per-token mean (the paper's 0.005 is only workable as a mean) or "
        "sum."))
    temperature: float = knob(1.0, lo=0.0, hi=5.0, help="Sampling temperature of the candidates (the paper: 1.0).")
    max_step_tokens: int = knob(128, lo=1, hi=100000, help=(
        "Longest candidate step (a candidate ends at the next blank line; sampling also stops near the original "
        "step's length)."))
    max_responses: int = knob(0, lo=0, hi=10**7, help=(
        "Distinct chosen responses refined (the rest pass through unrefined), to bound the stage's time on CPU. "
        "0: all."))
    batch_size: int = knob(16, lo=1, hi=100000, help="Rows (original + candidates) per KL forward pass.")
    scoring: str = knob("full", choices=("full", "fast", "reference"), help=(
        "How candidates are KL-scored: full scores every shorter candidate exactly (06 re-thresholds its log); fast "
        "scores length groups shortest first and rejects early on partial sums (the same accept decisions, KLs of "
        "rejected candidates are lower bounds); reference is the original slow path."))
    candidates: str = knob("sampler", choices=("sampler", "branch", "vllm"), help=(
        "Where candidates come from: sampler (the generation backend, one batch per group), branch (decoded from "
        "each response's own KV cache, no prefix re-encoding) or vllm (one n=K request per step, prefix caching)."))
    steps: str = knob("segments", choices=("segments", "spans"), help=(
        "How steps are cut: segments (text split at blank lines, each piece tokenized alone) or spans (token spans "
        "of the whole response's own tokenization: what the model really produced; Qwen merges '.\\n\\n' into one "
        "token, so the GPU profiles use spans)."))


@dataclass
class TrainingConfig:
    """Notebook 04's DPO-L training (TokenSqueeze §3.3): L = eta L_DPO-L + (1 - eta) L_SFT on the refined pairs."""

    beta: float = knob(0.1, lo=0.0, hi=100.0, lo_open=True, help=(
        "beta of DPO: how far the policy may move from the reference (base) model."))
    lam: float = knob(1.0, lo=0.0, hi=100.0, help="lambda: weight of the length margin log(l_l / l_w) in DPO-L.")
    eta: float = knob(0.5, lo=0.0, hi=1.0, help=(
        "Weight of DPO-L; 1 - eta goes to SFT on the chosen responses, the anchor that keeps accuracy "
        "(the paper: 0.5)."))
    length_margin_sign: int = knob(-1, choices=(-1, 1), help=(
        "Sign of the length term, ambiguous in the paper: -1 makes the length gap a margin to beat (fits the reward "
        "derivation), +1 a head start (notebook 06 ablates it)."))
    lr: float = knob(1e-5, lo=0.0, hi=1.0, lo_open=True, help="Peak learning rate (linear decay after warm-up).")
    epochs: float = knob(1.0, lo=0.0, hi=1000.0, lo_open=True, help="Passes over the refined pairs.")
    batch_size: int = knob(8, lo=1, hi=100000, help=(
        "Pairs per device per micro-step; the global batch is batch_size x grad_accum x num_processes."))
    grad_accum: int = knob(1, lo=1, hi=100000, help=(
        "Micro-steps per optimizer step: reaches the paper's batch of 128 when one pair fills a GPU."))
    warmup_ratio: float = knob(0.1, lo=0.0, hi=1.0, help="Share of the steps spent warming the learning rate up.")
    max_length: int = knob(1024, lo=16, hi=10**6, help=(
        "Longest prompt + response in tokens; longer pairs are truncated (the paper: 9,000)."))
    bf16: bool = knob(False, help="Mixed precision (bfloat16 compute, fp32 master weights): on GPUs.")
    gradient_checkpointing: bool = knob(False, help=(
        "Recompute activations in the backward pass: less memory for long sequences, about a third more time."))
    num_processes: int = knob(1, lo=1, hi=1024, help=(
        "Processes (one per GPU) training runs in; > 1 launches tsq_utils.method.train_entry through accelerate "
        "with configs/accelerate/<accelerate_config>.yaml."))
    accelerate_config: str = knob("ddp", choices=("ddp", "zero2", "zero3", "fsdp2"), help=(
        "With num_processes > 1: ddp keeps the whole model on every GPU; zero2, zero3 (DeepSpeed) and fsdp2 shard "
        "optimizer state, gradients and (zero3, fsdp2) weights, for models too big for one GPU."))
    save_steps: int = knob(0, lo=0, hi=10**7, help=(
        "A trainer checkpoint every save_steps optimizer steps (0: none); a rerun of the same training resumes "
        "from it, so an hours-long run survives an interruption."))


@dataclass
class EvaluationConfig:
    """Notebook 05's evaluation (also the decoding of 07's models): accuracy, Len-T, Len-A and the budget curve."""

    n_samples: int = knob(4, lo=1, hi=4096, help=(
        "Responses per evaluation problem, averaged (the paper: 16 runs); more narrows the standard errors."))
    temperature: float = knob(1.0, lo=0.0, hi=5.0, help="Decoding temperature (the paper: 0.6 on math).")
    top_p: float = knob(1.0, lo=0.0, hi=1.0, lo_open=True, help="Nucleus sampling threshold (1: off).")
    max_new_tokens: int = knob(512, lo=1, hi=10**6, help=(
        "Longest response (the paper: 32,768); a response cut there counts as not correct."))
    budget: int = knob(512, lo=1, hi=10**7, help=(
        "B: the token budget up to which the accuracy-vs-budget curve Acc(b) is integrated for AUC; the "
        "generation limit, as the paper's 32,768."))


@dataclass
class TLDRConfig:
    """Notebook 07's TLDR baseline (arXiv 2506.02678): SFT on a mix of short (System-1) and long (System-2) data
    whose weights are re-balanced during training by the dev set's length and accuracy."""

    update_every: int = knob(32, lo=1, hi=10**9, help="E: optimizer steps between re-weightings (the authors: 32).")
    eta: float = knob(4.0, lo=0.0, hi=1000.0, help="Step size of the weight update w <- softmax(log w + eta b).")
    smoothing: float = knob(1e-4, lo=0.0, hi=1.0, help=(
        "c: the weights become (1 - c) w + c / 2 after each update, so that neither pool's weight reaches 0."))
    acc_floor: float = knob(0.7, lo=0.0, hi=1.0, help=(
        "A checkpoint qualifies when its dev accuracy exceeds acc_floor x the long model's; the shortest "
        "qualifying one is kept."))
    lr: float = knob(1e-5, lo=0.0, hi=1.0, lo_open=True, help=(
        "Learning rate of the SFT runs (the authors: 1e-5, constant)."))
    max_steps: int = knob(200, lo=1, hi=10**7, help="Optimizer steps of each SFT run (the authors: up to 2,000).")
    batch_size: int = knob(8, lo=1, hi=100000, help="Examples per optimizer step.")
    n_dev_problems: int = knob(100, lo=1, hi=10**7, help=(
        "Held-out problems of the dev set that drives the re-weighting and the checkpoint choice."))
    easy_max_k: int = knob(0, lo=0, hi=1000, help=(
        "Toy world: problems with k <= easy_max_k are easy (System-1 pool), the others hard (System-2); 0: the "
        "midpoint of the k range. Set, it must lie in [toyworld.k_min, toyworld.k_max - 1] so both pools have "
        "problems."))
    dev_temperature: float = knob(0.0, lo=0.0, hi=5.0, help=(
        "Decoding of the dev evaluations during training. A choice (the paper is silent): 0, greedy, is "
        "deterministic and cheap."))
    floor_gaps: bool = knob(True, help=(
        "Floor |T_L - T_S| at 1 token and |A_L - A_S| at one dev problem (the dev set's resolution), so that "
        "coinciding reference points do not divide by zero; a no-op when they are apart. False: the paper's raw "
        "rule."))


@dataclass
class AblationsConfig:
    """Notebook 06: which sweep points run, how many training seeds the headline rows get, and the evaluation size."""

    seeds: int = knob(3, lo=1, hi=100, help=(
        "Training seeds of the headline rows (mean ± SD over them); every other row trains with seed 0 only, to "
        "keep the notebook's cost down."))
    headline: list = knob(factory=lambda: ["table2/shortest", "table2/q_dyn", "table3/kl", "table4/dpo"], help=(
        "Rows (\"table4/dpo\") or whole groups (\"table4\") trained with every seed: where the paper's claims are "
        "sharpest."))
    alphas: list = knob(factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 1.0], help=(
        "Selection alpha sweep points (Fig. 4), each in [0, 1]; selection.alpha is always added. One training "
        "each."))
    epsilons: list = knob(factory=lambda: [0.05], help=(
        "Refinement epsilon sweep points, each >= 0 and finite; refinement.epsilon and the no-KL rewrite "
        "(epsilon = inf) are always added. Each point is a full refinement run (notebook 03's cost)."))
    etas: list = knob(factory=lambda: [0.0, 0.75, 1.0], help=(
        "DPO-L weight sweep points, each in [0, 1]; training.eta is always added. One training each."))
    n_eval_problems: int = knob(140, lo=0, hi=10**7, help=(
        "Evaluation of each row: the first n problems of each benchmark (0: notebook 05's data.n_eval_problems)."))
    n_eval_samples: int = knob(1, lo=0, hi=4096, help=(
        "Responses per problem in each row's evaluation (0: notebook 05's evaluation.n_samples)."))
    max_steps: int = knob(0, lo=0, hi=10**7, help=(
        "Optimizer steps per trained row (0: training.epochs in full, as notebook 04), to bound the notebook's "
        "time over its many trainings."))
    batch_size: int = knob(0, lo=0, hi=10**6, help=(
        "Pairs per device per micro-step of every trained row (0: training.batch_size)."))
    num_processes: int = knob(0, lo=0, hi=1024, help=(
        "Training processes of every trained row (0: training.num_processes). 1 on a CPU profile whose notebook "
        "04 trains data-parallel: 06's rows already run side by side, one per worker."))
    lr: float = knob(0.0, lo=0.0, hi=1.0, help=(
        "Learning rate of every trained row (0: training.lr): a row trained for far fewer steps than notebook 04 "
        "gets further with a larger rate, and lands nearer where 04's full training does."))


@dataclass
class Profile:
    """A run's settings: profiles/<name>.yaml, each key overriding the default below."""

    name: str = knob(help=(
        "The profile's name: its file's stem, and the name of its run folder runs/<name>/ and figure folder "
        "figures/<name>/ (so it is one safe path component)."))
    description: str = knob("", help="One line of prose saying what the profile is for; no stage reads it.")
    seed: int = knob(1234, lo=0, hi=2**31 - 1, help=(
        "The run seed; every stage derives its own seed from it and the stage's name, so the same seed gives the "
        "same results."))
    threads: int = knob(1, lo=0, hi=1024, help=(
        "torch's CPU threads (0: torch's default). Float reductions can differ across thread counts, so it is "
        "part of what makes a run reproducible; 1 on the shared CPU boxes."))
    workers: int = knob(0, lo=0, hi=1024, help=(
        "How many processes (one torch thread each) run a stage's shards at once (0: every core this process may "
        "use). It decides only the wall time: the shards, and so every byte written, are fixed by `shards`, so a "
        "2-core box and a 16-core laptop write the same results. No stage's resume key reads it."))
    shards: int = knob(4, lo=1, hi=4096, help=(
        "How many fixed pieces the parallel stages split their work into (sampling, grading and evaluation by "
        "problem; ablation rows one per process): the unit that `workers` processes share. Part of what decides "
        "the bytes (each shard is its own batch), so it is a resume key."))
    device: str = knob("cpu", choices=("cpu", "cuda", "auto"), help=(
        "Where models run: cpu, cuda, or auto (CUDA when present, else the CPU). cuda (the GPU profiles) refuses to "
        "run without a visible GPU, naming the torch CUDA build and the NVIDIA driver found (a driver too old for "
        "the build hides the GPU); device: cpu, or the environment variable TSQ_ALLOW_CPU=1, runs on the CPU."))
    expensive: list = knob(factory=list, help=(
        "Stages (by name: sampling, refinement, ...) too costly to rerun for a code change alone: after an edit to "
        "the code they use, such a stage keeps its outputs and says \"kept: code changed since <commit>; pass "
        "--rerun-on-code-change\" (run_all.sh flag, or TSQ_RERUN_ON_CODE_CHANGE=1). A change of its inputs or "
        "profile values still reruns it. No stage's resume key reads it."))
    model: ModelConfig = field(default_factory=ModelConfig)
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    refinement: RefinementConfig = field(default_factory=RefinementConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tldr: TLDRConfig = field(default_factory=TLDRConfig)
    ablations: AblationsConfig = field(default_factory=AblationsConfig)
    # the file the profile was loaded from (set by load_profile; not a profile key)
    source_file: str = ""

    def to_dict(self) -> dict:
        """The profile as plain data (for manifests)."""
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        return d
