"""The stage table: what each notebook reads (upstream artifacts, profile values) and what it writes.

Resume (``stage.Stage.is_done``) compares exactly the profile values a stage reads, as listed here, plus the
hashes of its inputs and the code fingerprint (``fingerprint``); an edit anywhere else in the profile reruns
nothing. A stage's outputs are its downstream's inputs, so a knob of stage X reruns X, and the stages after it
rerun because X's outputs' hashes changed (when they did).

``reads`` names profile sections ("sampling") or dotted keys ("data.train"); ``skips`` takes dotted keys back
out of a listed section. A section listed whole includes the fields added to it later (the safe side); a new
field that a stage does not read goes into its ``skips``, with the reason. The reads were worked out from the
notebooks (``P.<section>.<key>``) and the package functions they call; where a value only reaches a stage
through an upstream artifact (the base model's weights through ``pretrain``), the input hash covers it and the
section is not listed. tests/test_resume_keys.py checks every profile key is read by some stage or listed in
NOT_READ, and every profile key a notebook names is in its stage's reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Read by every stage that loads or runs a model: the run seed (each stage's seed derives from it), torch's thread
# count (float reductions can differ across thread counts), the device, and the model settings (dtype, source,
# path, local_override: how the base model is loaded, which its weights' hash does not cover).
RUNTIME = ("seed", "threads", "shards", "device", "model")

# The base model that notebook 00 recorded: its pointer (base_model/base_model.json) and the weights it names
# (base_model.base_inputs); stages that load the base model declare it with base=True.
BASE_INPUTS = ("base_model", "base_weights")

# Profile keys no stage reads: the profile's name is the run folder itself, its description is prose, and `workers`
# only decides how many of the fixed shards run at once (core/parallel.py), never a byte of the results; `expensive`
# only decides whether a code change alone reruns a stage (core/stage.py).
NOT_READ = ("name", "description", "workers", "expensive")


@dataclass(frozen=True)
class StageSpec:
    """One stage: its notebook, upstream artifacts, outputs, and the profile values it reads."""

    name: str
    notebook: str  # file name under notebooks/
    inputs: dict[str, tuple[str, str]]  # input name -> (upstream stage, artifact file or folder)
    base: bool  # also reads the base model (BASE_INPUTS)
    outputs: tuple[str, ...]  # always written
    optional_outputs: tuple[str, ...]  # written on some profiles or with some parameters
    reads: tuple[str, ...]  # profile sections or dotted keys
    skips: tuple[str, ...] = ()  # dotted keys inside a read section that the stage does not read
    # tsq_utils modules the stage runs beyond what its notebook imports (transitively; core/stage.stage_modules),
    # e.g. one started by name in a subprocess
    code: tuple[str, ...] = ()

    def input_names(self) -> list[str]:
        """The names of the stage's inputs, upstream artifacts first, then the base model's."""
        return [*self.inputs, *(BASE_INPUTS if self.base else ())]


def _covers(prefixes: tuple[str, ...], key: str) -> bool:
    """True when a dotted key is one of the prefixes or lies under one."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


PIPELINE: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec(
            "base_model", "00_base_model.ipynb", inputs={}, base=True,
            outputs=("base_model.json",), optional_outputs=("heldout_greedy.parquet", "heldout_sampled.parquet"),
            # pretrain: retrains the toy reasoner; toyworld: the demo and held-out problems; sampling: the held-out
            # evaluation's decoding and the hub sampler (vLLM engine); data: the hub demo problem (first benchmark
            # of data.eval, local files) and the held-out count (data.n_eval_problems off the toy profile)
            reads=(*RUNTIME, "pretrain", "toyworld", "data", "sampling"),
            # the held-out evaluation draws its own number of samples (parameter eval_samples); 00 never reads the
            # training set
            skips=("sampling.n", "data.train", "data.n_train_problems"),
        ),
        StageSpec(
            "sampling", "01_sampling.ipynb", inputs={}, base=True, outputs=("samples.parquet",), optional_outputs=(),
            # data: the training problems (data.train, n_train_problems, local files); toyworld: toy problems
            reads=(*RUNTIME, "toyworld", "data", "sampling"),
            # the evaluation set is 05's. (Under vLLM the engine's context length is max(sampling, evaluation
            # max_new_tokens) + room: evaluation.max_new_tokens can only lengthen it beyond what 01 generates,
            # which changes no sample, so evaluation is not read.)
            skips=("data.eval", "data.n_eval_problems"),
        ),
        StageSpec(
            "selection", "02_selection.ipynb", inputs={"samples": ("sampling", "samples.parquet")}, base=False,
            outputs=("pairs.parquet", "problem_stats.parquet"), optional_outputs=(),
            # pandas only: no model, device or threads; the seed draws the max_pairs subsets
            reads=("seed", "selection"),
        ),
        StageSpec(
            "refinement", "03_kl_refinement.ipynb", inputs={"pairs": ("selection", "pairs.parquet")}, base=True,
            outputs=("refined_pairs.parquet", "step_log.parquet"), optional_outputs=(),
            # data.train picks the grader (toy or math) that decides reverts. 03 also reads samples.parquet, for
            # the gold answers only: a gold is a function of its problem, and the pairs' hash covers which problems
            reads=(*RUNTIME, "refinement", "data.train"),
        ),
        StageSpec(
            "training", "04_dpo_l_training.ipynb", inputs={"pairs": ("refinement", "refined_pairs.parquet")}, base=True,
            outputs=("model", "training_log.parquet"), optional_outputs=(),
            reads=(*RUNTIME, "training"),
        ),
        StageSpec(
            "evaluation", "05_evaluation.ipynb", inputs={"trained_model": ("training", "model")}, base=True,
            outputs=("results.parquet", "metrics.json", "metrics.md"), optional_outputs=("budget_forced.parquet",),
            # data/toyworld: the evaluation problems; sampling: batch size, backend and the vLLM engine's settings
            # (memory share, parallelism, context length: max of sampling and evaluation max_new_tokens)
            reads=(*RUNTIME, "toyworld", "data", "sampling", "evaluation"),
            # 05 decodes with evaluation.*, and never reads the training set
            skips=("sampling.n", "sampling.temperature", "sampling.top_p", "data.train", "data.n_train_problems"),
        ),
        StageSpec(
            "ablations", "06_ablations.ipynb", inputs={"samples": ("sampling", "samples.parquet")}, base=True,
            outputs=("summary.parquet", "tables.md"), optional_outputs=(),
            # every row reruns selection, refinement, training and evaluation on 01's samples; its cache keys read
            # the same values (ablations.payloads). Not pretrain (through the base weights) nor tldr.
            reads=(*RUNTIME, "toyworld", "data", "sampling", "selection", "refinement", "training", "evaluation",
                   "ablations"),
        ),
        StageSpec(
            "tldr", "07_tldr.ipynb",
            inputs={"samples": ("sampling", "samples.parquet"),
                    "evaluation_results": ("evaluation", "results.parquet")},
            base=True,
            outputs=("pools.parquet", "references.json", "trajectory.parquet", "batches.parquet",
                     "training_log.parquet", "chosen.json", "model", "static_mix_model", "results.parquet",
                     "metrics.json", "metrics.md"),
            optional_outputs=(),
            # data/toyworld: training problems (System-1 pool), dev and evaluation problems; evaluation: 05's
            # decoding for its two models and the metrics' budget; training: only the sequence length, precision
            # and checkpointing of its SFT runs (its optimizer settings are tldr.*)
            reads=(*RUNTIME, "toyworld", "data", "sampling", "evaluation", "tldr", "training.max_length",
                   "training.bf16", "training.gradient_checkpointing"),
            skips=("sampling.n", "sampling.temperature", "sampling.top_p"),
        ),
    )
}


# The artifact tables' schemas, beside the stage table: (stage, file) -> {column: kind} of the columns later stages
# read (a table may hold more). Kinds: "str", "int", "float" (an int column passes), "bool". Checked when a stage
# finishes (on write), when a later stage requires the table (on read), and when the ablation cache verifies an
# entry: a wrong or missing column is an error naming the file and the column (core/artifacts.check_table).
_RESULTS = {"model": "str", "benchmark": "str", "problem_id": "str", "correct": "bool", "n_tokens": "int"}
_PAIRS = {"problem_id": "str", "prompt": "str", "chosen": "str", "rejected": "str", "chosen_tokens": "int",
          "rejected_tokens": "int"}
SCHEMAS: dict[tuple[str, str], dict[str, str]] = {
    ("sampling", "samples.parquet"): {"problem_id": "str", "k": "int", "sample_idx": "int", "prompt": "str",
                                      "text": "str", "n_tokens": "int", "correct": "bool", "finish_reason": "str"},
    ("selection", "pairs.parquet"): _PAIRS,
    ("selection", "problem_stats.parquet"): {"problem_id": "str", "n": "int", "c": "int", "p": "float",
                                             "n_pos": "int", "n_pairs": "int"},
    ("refinement", "refined_pairs.parquet"): _PAIRS,
    ("refinement", "step_log.parquet"): {"accepted": "bool", "orig_tokens": "int", "final_tokens": "int"},
    ("evaluation", "results.parquet"): _RESULTS,
    ("tldr", "results.parquet"): _RESULTS,
}


def schema(stage: str | None, file: str) -> dict[str, str] | None:
    """The schema of a table by stage and file name (stage None: by file name alone, as a cache entry holds it)."""
    if stage is not None:
        return SCHEMAS.get((stage, file))
    found = [v for (_, f), v in SCHEMAS.items() if f == file]
    return found[0] if found else None


def spec(stage: str) -> StageSpec:
    """The table row of a stage; ValueError naming the stages for an unknown one."""
    if stage not in PIPELINE:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(PIPELINE)}")
    return PIPELINE[stage]


def reads_key(stage: str, dotted: str) -> bool:
    """True when the stage reads this profile value (a dotted key such as "selection.alpha")."""
    s = spec(stage)
    return _covers(s.reads, dotted) and not _covers(s.skips, dotted)


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {dotted key: leaf value} (an empty mapping is a leaf)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def profile_reads(stage: str, profile_dict: Mapping) -> dict[str, Any]:
    """The profile values a stage reads, as {dotted key: value}, from a profile's to_dict()."""
    return {k: v for k, v in flatten(profile_dict).items() if reads_key(stage, k)}


def downstream(stage: str) -> list[str]:
    """The stages that read an artifact of this one, directly or through others, in pipeline order."""
    spec(stage)
    found = {stage}
    for s in PIPELINE.values():
        if any(up in found for up, _ in s.inputs.values()) or (s.base and "base_model" in found):
            found.add(s.name)
    return [s for s in PIPELINE if s in found and s != stage]


def stage_table() -> str:
    """The stage table as Markdown (docs/architecture.md): notebook, inputs, outputs, and the profile values read."""

    def code(items) -> str:
        return ", ".join(f"`{i}`" for i in items) or "none"

    lines = ["| notebook | stage | inputs (upstream stage: artifact) | outputs (*optional*) | profile values read |",
             "|---|---|---|---|---|"]
    for s in PIPELINE.values():
        inputs = [f"{up}: `{art}`" for up, art in s.inputs.values()] + (["the base model"] if s.base else [])
        outputs = [f"`{o}`" for o in s.outputs] + [f"*`{o}`*" for o in s.optional_outputs]
        reads = code(s.reads).replace(code(RUNTIME), "RUNTIME") if s.reads[: len(RUNTIME)] == RUNTIME else code(s.reads)
        if s.skips:
            reads += f"; not {code(s.skips)}"
        lines.append(f"| `{s.notebook[:-6]}` | {s.name} | {', '.join(inputs) or 'none'} | {', '.join(outputs)} | "
                     f"{reads} |")
    lines += ["", f"RUNTIME = {code(RUNTIME)}: what every stage that loads or runs a model reads. The base model is "
              f"{code(BASE_INPUTS)} (notebook 00's pointer and the weights it names). Keys no stage reads: "
              f"{code(NOT_READ)}."]
    return "\n".join(lines) + "\n"
