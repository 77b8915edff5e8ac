"""What setting up a stage raises when an upstream artifact is missing, stale or empty, with the fix for each."""

from __future__ import annotations

# What an empty upstream table usually means, and what to change (stage, file) -> hint.
EMPTY_HINTS: dict[tuple[str, str], str] = {
    ("selection", "pairs.parquet"): (
        "no problem had a response to prefer over another (a correct response shorter than a rival): with greedy "
        "sampling (sampling.temperature 0) every response to a problem is the same, and with sampling.n 1 a problem "
        "has no second response to pair with; sample with a temperature > 0, more responses (sampling.n >= 2) or "
        "more problems, then rerun notebooks 01 and 02"),
    ("refinement", "refined_pairs.parquet"): "notebook 03 kept no pair; see its step log and summary",
    ("sampling", "samples.parquet"): "notebook 01 drew no responses; check data.n_train_problems and sampling.n",
}


class MissingArtifactError(FileNotFoundError):
    """An upstream artifact is missing; the message names the notebook to run first."""


class StaleArtifactError(MissingArtifactError):
    """An upstream artifact exists but its stage did not complete, or it changed since; the message names the fix."""


class EmptyArtifactError(ValueError):
    """An upstream table has no rows, so this stage has nothing to work on; the message says why and what to change."""
