"""Notebook 06: the paper's ablations (Tables 2–4, Fig. 4) and the ε, margin-sign and η sweeps, as cached rows.

A *row* is one named variant of the pipeline run on stage 01's samples table (never resampled):
selection (variant, α) → refinement (off; KL-constrained with ε; or the rewrite without the KL check,
ε = ∞) → training (objective, η, length-margin sign, training seed) → evaluation. Each stage runs through
the function its notebook uses (selection.select_pairs, refinement.refine_pairs / rethreshold,
dpo_l.train_and_save, evaluation.evaluate_model) and is cached under a key of exactly what decides it, so rows
that share a prefix share its work (Table 3's "none" is Table 2's Q-DYN and Fig. 4's α = 0.2; every ε point and
the no-KL rewrite share one scoring run), the default row adopts the pipeline's own artifacts, and a rerun is
instant.

The parts, in the order a row passes through them:

    rows      Row, make_row and the rows of the tables and sweeps (build_rows, select_rows, describe_rows)
    context   AblationContext: the profile, stage 01's samples, the base model's hashes, the evaluation set
    cache_keys  cache keys and payloads (the selection knobs from selection.REGISTRY)
    cache       entries, adoption of notebooks 02–05's artifacts, twins (rows whose different settings gave the
                very same pairs); cache_entries verifies, lists and prunes the entries on disk
    runner    run_row / run_rows (each stage computed or taken from the cache), plan, costs
    report    summarize, aggregate, the tables beside the paper's 7B numbers, the paper's findings checked

This module re-exports what notebook 06 and the tests use: `from tsq_utils import ablations; ablations.run_rows`.
"""

from __future__ import annotations

from . import cache, cache_entries, cache_keys, context, report, rows, runner
from .cache import (CACHE_META, TWINS, cache_key, data_sha, payloads, refinement_params, refinement_payloads, row_keys,
                    selection_params, train_seed, training_params)
from .context import AblationContext, make_context, subset_problems
from .report import (METRICS, PAPER_ABLATIONS, PAPER_BUDGET, PAPER_FIG4, SUMMARY_COLUMNS, TABLE_COLUMNS, TABLE_FILES,
                     TITLES, aggregate, findings, findings_markdown, row_results, save_tables, summarize,
                     table_markdown)
from .rows import (GROUPS, OBJECTIVE_LABELS, OBJECTIVES, REFINE_MODES, Row, RowChange, build_rows, describe_rows,
                   make_row, matches, select_rows, sweep_rows, table_rows)
from .runner import costs, plan, run_row, run_rows

__all__ = [
    "cache", "cache_entries", "cache_keys", "context", "report", "rows", "runner",
    "CACHE_META", "TWINS", "cache_key", "data_sha", "payloads", "refinement_params", "refinement_payloads", "row_keys",
    "selection_params", "train_seed", "training_params",
    "AblationContext", "make_context", "subset_problems",
    "METRICS", "PAPER_ABLATIONS", "PAPER_BUDGET", "PAPER_FIG4", "SUMMARY_COLUMNS", "TABLE_COLUMNS", "TABLE_FILES",
    "TITLES", "aggregate", "findings", "findings_markdown", "row_results", "save_tables", "summarize", "table_markdown",
    "GROUPS", "OBJECTIVE_LABELS", "OBJECTIVES", "REFINE_MODES", "Row", "RowChange", "build_rows", "describe_rows",
    "make_row", "matches", "select_rows", "sweep_rows", "table_rows",
    "costs", "plan", "run_row", "run_rows",
]
