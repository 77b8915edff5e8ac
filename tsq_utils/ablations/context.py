"""What every ablation row needs: the profile, stage 01's samples, the base model's hashes, the evaluation set."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..core import pipeline
from ..core.artifacts import file_hash, load_table, path_hash
from ..core.config import Profile, resolve_device, stage_seed
from ..core.pointer import base_inputs, base_ref
from ..core.stage import notebook_for
from ..method.evaluation import eval_problems
from ..model.base_model import load_base, load_tokenizer
from ..task.registry import training_task

# The stage 01 artifact every row starts from, as the stage table declares it (stage, file)
SAMPLES = pipeline.spec("ablations").inputs["samples"]


@dataclass
class AblationContext:
    """What every row needs: the profile, the samples table, the base model's hashes, the evaluation set, the cache."""

    profile: Profile
    run_dir: Path
    samples: pd.DataFrame
    samples_sha: str
    base_hashes: dict[str, str]
    tokenizer: Any
    problems: dict[str, pd.DataFrame]
    eval_n: int
    device: str
    grader: str
    max_steps: int = 0
    forced: set = field(default_factory=set)  # keys recomputed under force in this session
    _base_model: Any = None

    @property
    def cache_dir(self) -> Path:
        """runs/<profile>/ablations/cache."""
        return self.run_dir / "ablations" / "cache"

    @property
    def selection_seed(self) -> int:
        """Notebook 02's seed."""
        return stage_seed(self.profile.seed, "selection")

    @property
    def refinement_seed(self) -> int:
        """Notebook 03's seed."""
        return stage_seed(self.profile.seed, "refinement")

    @property
    def eval_seed(self) -> int:
        """Notebook 05's seed (fixed for every row)."""
        return stage_seed(self.profile.seed, "evaluation")

    @property
    def base_model(self) -> Any:
        """The base model, loaded on first use (refinement samples from it)."""
        if self._base_model is None:
            self._base_model, _ = load_base(self.run_dir, self.profile)
        return self._base_model

    @functools.cached_property
    def _problems_sha(self) -> str:
        """SHA-256 of the evaluation problems' ids, prompts and golds (computed once per context)."""
        problems = {b: p[["problem_id", "prompt", "gold"]].astype(str).values.tolist()
                    for b, p in self.problems.items()}
        return hashlib.sha256(json.dumps(problems, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()

    def eval_spec(self) -> dict:
        """Everything that decides a model's evaluation results, except the model."""
        E, S = self.profile.evaluation, self.profile.sampling
        return {"problems": self._problems_sha, "n": self.eval_n, "temperature": E.temperature,
                "top_p": E.top_p, "max_new_tokens": E.max_new_tokens, "seed": self.eval_seed,
                "batch_size": S.batch_size, "backend": S.backend, "device": self.device}


def subset_problems(problems: dict[str, pd.DataFrame], n: int) -> dict[str, pd.DataFrame]:
    """The first n problems of each benchmark (0: all); toy problems cycle through k, so the first n cover every k."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n_eval_problems must be an integer >= 0, got {n!r}")
    return {b: (p if n == 0 else p.head(n)).reset_index(drop=True) for b, p in problems.items()}


def make_context(profile: Profile, run_dir: Path) -> AblationContext:
    """The context of a profile's run folder: samples of stage 01, base model hashes, tokenizer, evaluation subset."""
    run_dir = Path(run_dir)
    samples_path = run_dir / SAMPLES[0] / SAMPLES[1]
    if not samples_path.is_file():
        raise FileNotFoundError(f"{samples_path} is missing: run {notebook_for(SAMPLES[0])} first "
                                f"(profile {profile.name})")
    A = profile.ablations
    tok = load_tokenizer(*base_ref(run_dir, profile))  # the tokenizer alone: an all-cached rerun loads no model
    return AblationContext(
        profile=profile, run_dir=run_dir, samples=load_table(samples_path), samples_sha=file_hash(samples_path),
        base_hashes={k: path_hash(v) for k, v in base_inputs(run_dir, profile).items()}, tokenizer=tok,
        problems=subset_problems(eval_problems(profile, tok), A.n_eval_problems),
        eval_n=A.n_eval_samples or profile.evaluation.n_samples, device=resolve_device(profile),
        grader=training_task(profile).grader, max_steps=A.max_steps,
    )
