"""Math benchmarks (MATH500, AIME24/25, GSM8K, AMC23) as DataFrames, the R1 prompt, and R1 traces."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from ..core.artifacts import read_jsonl  # one home: re-exported here for the tests and notebooks
from ..core.config import REPO_ROOT
from .format import THINK_OPEN as THINK_START
from .grading import extract_boxed

R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
BENCHMARK_COLUMNS = ["problem_id", "problem", "gold", "k", "source"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives on the hub and which local file replaces it."""

    hub_id: str
    config: str | None
    split: str
    n: int  # rows in the full test set
    local_file: str  # file name in ../shared/data (its schema is what a local override must follow)
    # how a record becomes a gold string: "text", "gsm8k", "number", or "boxed_solution" (the answer field
    # if there is one, else the last \boxed{} of the worked solution)
    gold_kind: str
    has_level: bool = False  # MATH difficulty 1..5 in a "level" field


# Public, script-free hub datasets (trust_remote_code is never needed nor passed).
BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec("HuggingFaceH4/MATH-500", None, "test", 500, "math500_test.jsonl", "text", True),
    "aime24": BenchmarkSpec("HuggingFaceH4/aime_2024", None, "train", 30, "aime24_test.jsonl", "number"),
    "aime25": BenchmarkSpec(
        "math-ai/aime25",
        None,
        "test",
        30,
        "aime25_DeepSeek-R1-Distill-Qwen-7B_aime_25_rollout_temperature0.6.jsonl",
        "number",
    ),
    "gsm8k": BenchmarkSpec("openai/gsm8k", "main", "test", 1319, "gsm8k_test.jsonl", "gsm8k"),
    "amc23": BenchmarkSpec("math-ai/amc23", None, "test", 40, "amc23_test.jsonl", "number"),
    # The training set of the GPU profiles (TokenSqueeze names none): the 7,500 problems of the MATH train split
    # (Hendrycks et al.), disjoint from MATH500, which is drawn from the MATH test split. Rows carry problem,
    # level ("Level 3"), type and solution; the gold is the solution's last \boxed{}. No local copy ships in
    # ../shared/data: a local override is any JSONL with problem and solution (or answer) fields.
    "math_train": BenchmarkSpec(
        "DigitalLearningGmbH/MATH-lighteval", None, "train", 7500, "math_train.jsonl", "boxed_solution", True
    ),
}

# Field names across the hub and local schemas, in order of preference.
_PROBLEM_FIELDS = ("problem", "question", "instruction", "Problem", "Question")
_ANSWER_FIELDS = ("answer", "Answer")
_ID_FIELDS = ("unique_id", "id", "idx", "ID")
_SOLUTION_FIELDS = ("solution", "Solution")


class BenchmarkLoadError(RuntimeError):
    """A benchmark could not be fetched from the hub."""


# ----------------------------------------------------------------------------- gold answers


def parse_gsm8k_answer(answer: str) -> str:
    """The final number of a GSM8K worked answer: the text after '#### ', without commas."""
    _, sep, final = str(answer).rpartition("####")
    if not sep:
        raise ValueError(f"GSM8K answer has no '#### ' final line: {str(answer)[-80:]!r}")
    gold = final.strip().replace(",", "")
    if not gold:
        raise ValueError(f"GSM8K answer has an empty final line: {str(answer)[-80:]!r}")
    return gold


def normalize_number(answer: Any) -> str:
    """A numeric answer as a plain string: 27.0 and "27.0" become "27"; 2.5 stays "2.5"."""
    text = str(answer).strip()
    # integers by regex, not float(): a long integer would lose digits through a float
    m = re.fullmatch(r"([+-]?\d+)(?:\.0*)?", text)
    if m:
        return str(int(m.group(1)))
    try:
        value = float(text)
    except ValueError:
        return text  # not a plain number (e.g. a LaTeX expression): keep it for math-verify
    if not math.isfinite(value):
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def gold_from_solution(solution: str) -> str:
    """The last complete \\boxed{} of a worked solution (MATH's convention for the final answer)."""
    answer = extract_boxed(str(solution))
    if answer is None or not answer.strip():
        raise ValueError(f"solution has no complete \\boxed{{}} answer: ...{str(solution)[-80:]!r}")
    return answer.strip()


def _gold(row: dict, kind: str) -> str:
    if kind == "boxed_solution":
        if any(row.get(f) is not None for f in _ANSWER_FIELDS):
            return str(_first(row, _ANSWER_FIELDS, "answer")).strip()
        return gold_from_solution(_first(row, _SOLUTION_FIELDS, "answer or solution"))
    raw = _first(row, _ANSWER_FIELDS, "answer")
    parse = {"gsm8k": parse_gsm8k_answer, "number": normalize_number}.get(kind, lambda x: str(x).strip())
    return parse(raw)


def _first(row: dict, fields: tuple[str, ...], what: str) -> Any:
    for f in fields:
        if f in row and row[f] is not None:
            return row[f]
    raise ValueError(f"record has no {what} field (looked for {', '.join(fields)}); its fields: {sorted(row)}")


def _level(value: Any) -> int:
    """MATH difficulty from 3 or "Level 3"; 0 when unknown ("Level ?")."""
    m = re.search(r"\d+", str(value))
    return int(m.group(0)) if m else 0


def _normalize_rows(name: str, rows: list[dict], source: str) -> pd.DataFrame:
    spec = BENCHMARKS[name]
    records = []
    for i, row in enumerate(rows):
        try:
            raw_id = next((row[f] for f in _ID_FIELDS if row.get(f) is not None), i)
            problem = str(_first(row, _PROBLEM_FIELDS, "problem")).strip()
            gold = _gold(row, spec.gold_kind)
        except ValueError as e:
            raise ValueError(f"{name} record {i} of {source}: {e}") from e
        if not problem or not gold:
            raise ValueError(f"{name} record {i} of {source}: empty problem or gold")
        k = _level(row["level"]) if spec.has_level and "level" in row else 0
        records.append({"problem_id": f"{name}/{raw_id}", "problem": problem, "gold": gold, "k": k, "source": source})
    df = pd.DataFrame.from_records(records, columns=BENCHMARK_COLUMNS).astype({"k": int})
    dup = df["problem_id"][df["problem_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{name} from {source}: duplicate problem ids, e.g. {dup.iloc[0]!r}")
    return df


# ----------------------------------------------------------------------------- loading


def _hub_rows(name: str) -> list[dict]:
    spec = BENCHMARKS[name]
    try:
        ds = datasets.load_dataset(spec.hub_id, spec.config, split=spec.split)
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: all end the same way
        raise BenchmarkLoadError(
            f"could not load {name} from the hub ({spec.hub_id}"
            f"{'/' + spec.config if spec.config else ''}, split {spec.split}): {type(e).__name__}: {e}. "
            f"Pass a local JSONL file instead: load_benchmark({name!r}, local_path=...), or in a profile "
            f"data.local_files: {{{name}: PATH}}. One JSON object per line with a problem (or question) "
            f"field and an answer field, like {spec.local_file}"
        ) from e
    return ds.to_list()


def load_benchmark(name: str, local_path: str | Path | None = None, limit: int | None = None) -> pd.DataFrame:
    """A benchmark's problems: problem_id, problem, gold, k (level, 0 if unknown), source."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of problems or None, got {limit}")
    if local_path:
        rows, source = read_jsonl(local_path), str(local_path)
    else:
        spec = BENCHMARKS[name]
        rows, source = _hub_rows(name), f"hf:{spec.hub_id}"
    if limit is not None:
        rows = rows[:limit]
    return _normalize_rows(name, rows, source)


def resolve_local(path: str | Path) -> Path:
    """A local path as given by a profile or a notebook parameter: ~ expanded, relative to the repository root."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else REPO_ROOT / p).resolve()


def local_path_for(name: str, local_files: dict | None = None, local_dir: str | Path = "") -> Path | None:
    """The local file that replaces benchmark `name`: local_files[name], else local_dir/<its file name>; None = hub."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if local_files and local_files.get(name):
        path, where = resolve_local(local_files[name]), f"data.local_files[{name!r}]"
    elif local_dir:
        folder = resolve_local(local_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"data.local_dir {str(local_dir)!r} is not a folder (resolved to {folder})")
        path, where = folder / BENCHMARKS[name].local_file, f"data.local_dir ({folder})"
    else:
        return None
    if not path.is_file():
        raise FileNotFoundError(
            f"{where}: no file {path} for benchmark {name!r}; give it in data.local_files "
            f"(one JSON object per line, like {BENCHMARKS[name].local_file}) or load it from the hub"
        )
    return path


# ----------------------------------------------------------------------------- prompts and traces


def r1_prompt(problem: str, tokenizer: Any = None) -> str:
    """The R1-style prompt for a problem; chat-formatted, ending in "<think>\\n", given a tokenizer."""
    content = f"{problem.strip()}\n{R1_INSTRUCTION}"
    if tokenizer is None:
        return content
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; "
                         "pass tokenizer=None for plain text")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    # newer R1-Distill templates open the thinking block themselves, older ones do not
    stripped = prompt.rstrip()
    if stripped.endswith(THINK_START):
        return stripped + "\n"
    return prompt + THINK_START + "\n"


def load_r1_traces(path: str | Path) -> pd.DataFrame:
    """R1 rollouts (the aime25_*_rollout files): problem_id, problem, completion, is_correct, gold, extracted_answer."""
    rows = read_jsonl(path)
    records = []
    for i, row in enumerate(rows):
        missing = {"completion", "is_correct", "answer", "instruction"} - set(row)
        if missing:
            raise ValueError(f"{path} record {i} lacks {sorted(missing)}; is it an R1 rollout file?")
        completion = row["completion"]
        # some rollouts repeat the prompt's "<think>\n"; drop it so every completion continues the prompt
        if completion.lstrip().startswith(THINK_START):
            completion = completion.lstrip()[len(THINK_START) :].lstrip("\n")
        records.append(
            {
                "problem_id": f"aime25/{row.get('id', i)}",
                "problem": row["instruction"].strip(),
                "completion": completion,
                "is_correct": bool(row["is_correct"]),
                "gold": normalize_number(row["answer"]),
                "extracted_answer": str(row.get("extracted_model_answer", "")),
            }
        )
    return pd.DataFrame.from_records(records)
