"""Quiet lesson output: library progress bars, library warnings, the trainer's per-step loss table, long tables.

None of it changes a result: only what a notebook displays. The trainer's own progress bar stays (one per long cell).
"""

from __future__ import annotations

import logging
import warnings

import datasets
import pandas as pd
import transformers
from transformers.utils import notebook as hf_notebook

# A table longer than this shows its first and last MIN_ROWS / 2 rows (pandas' own condensed view): one problem's N
# samples are 48 rows on toy, a handful on ci (tests/test_quiet.py allows 30)
MAX_ROWS, MIN_ROWS = 30, 12

# Libraries whose deprecation notices and one-off data warnings concern their own upgrades, not the lesson.
_LIBRARIES = r"(transformers|trl|datasets|accelerate|peft|torch)(\..*)?"


# transformers modules whose one-off notices (a sequence over the tokenizer's length, generation defaults) concern
# single inputs; set one by one, never the "transformers" logger itself. Not modeling_utils: from_pretrained runs an
# extra tensor-parallel check, with warnings of its own, when that logger's own level is WARNING or above.
_TRANSFORMERS_NOTICES = ("transformers.tokenization_utils_base", "transformers.generation.utils",
                         "transformers.generation.configuration_utils", "transformers.configuration_utils")


def _no_loss_table(self, args, state, control, logs=None, **kwargs) -> None:
    """NotebookProgressCallback.on_log without the table: the notebook plots the training log itself."""


def quiet_libraries() -> None:
    """Hide library progress bars (model loading, dataset maps), warnings and the trainer's loss table; condense long
    tables."""
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    datasets.disable_progress_bars()  # "Tokenizing train dataset" and the other dataset maps
    # only these loggers: the transformers logger's level also decides TrainingArguments.disable_tqdm, the one bar kept
    for name in ("trl", "datasets", "accelerate", *_TRANSFORMERS_NOTICES):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=_LIBRARIES)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=_LIBRARIES)
    warnings.filterwarnings("ignore", category=UserWarning, module=_LIBRARIES)
    hf_notebook.NotebookProgressCallback.on_log = _no_loss_table
    pd.set_option("display.max_rows", MAX_ROWS)
    pd.set_option("display.min_rows", MIN_ROWS)
