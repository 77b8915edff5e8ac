"""The lessons' quiet switch: library notices and bars off, the trainer's own progress bar kept."""

from __future__ import annotations

import logging

import datasets
import pandas as pd
import transformers
from transformers import TrainingArguments
from transformers.utils import notebook as hf_notebook

from tsq_utils.lessons import quiet


def test_quiet_keeps_the_trainer_bar_and_drops_the_loss_table(tmp_path):
    original = hf_notebook.NotebookProgressCallback.on_log
    try:
        quiet.quiet_libraries()
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled()
        assert logging.getLogger("trl.trainer.dpo_trainer").getEffectiveLevel() == logging.ERROR
        assert logging.getLogger("transformers.tokenization_utils_base").getEffectiveLevel() == logging.ERROR
        # the trainer decides its progress bar from the transformers logger's level: untouched, so the bar stays
        assert TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True).disable_tqdm is False
        assert hf_notebook.NotebookProgressCallback.on_log is not original
        # one problem's 48 samples show as their first and last 6 rows, a 30-row table in full
        assert pd.DataFrame({"x": range(48)})._repr_html_().count("<tr") == 1 + quiet.MIN_ROWS + 1
        assert pd.DataFrame({"x": range(30)})._repr_html_().count("<tr") == 1 + 30
    finally:
        pd.reset_option("display.max_rows")
        pd.reset_option("display.min_rows")
        hf_notebook.NotebookProgressCallback.on_log = original
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
        for name in ("trl", "datasets", "accelerate", *quiet._TRANSFORMERS_NOTICES):
            logging.getLogger(name).setLevel(logging.NOTSET)
