"""Helpers for the tokensqueeze-companion notebooks, in layers that import only downward:

core (profiles, stages, artifacts) < task (problems, prompt, grading, format) < model (loading, generation)
< method (selection, refinement, DPO-L, evaluation, TLDR) < ablations, lessons. See docs/architecture.md.
"""

__version__ = "0.1.0"
