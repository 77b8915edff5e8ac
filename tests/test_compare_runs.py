"""scripts/compare_runs.py: two run folders' results are equal when only timings, fingerprints and paths differ."""

import importlib.util
import json
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_runs", REPO / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_runs)


def _run(root: Path, acc: float, seconds: float, fingerprint: str) -> Path:
    """A one-stage run folder: a table, a summary with a timing, a path and a fingerprint, a manifest."""
    stage = root / "evaluation"
    stage.mkdir(parents=True)
    pd.DataFrame({"acc": [acc, 0.5], "seconds_eval": [seconds, 1.0], "model_key": [fingerprint, "x"]}).to_parquet(
        stage / "results.parquet")
    (stage / "summary.json").write_text(json.dumps(
        {"acc": acc, "wall_time_s": seconds, "model": str(root.resolve() / "training" / "model"),
         "stages": [{"fingerprint": fingerprint, "n": 3}]}))
    (stage / "manifest.json").write_text(json.dumps({"created": seconds}))
    (stage / "model").mkdir()
    (stage / "model" / "config.json").write_text(json.dumps({"seed": seconds}))
    return root


def test_equal_up_to_timings_fingerprints_and_paths(tmp_path, capsys):
    a = _run(tmp_path / "a", 0.75, 1.5, "f00")
    b = _run(tmp_path / "b", 0.75, 9.5, "baa")
    assert compare_runs.result_files(a) == {"evaluation/results.parquet", "evaluation/summary.json"}
    assert all(compare_runs.same(a / f, b / f, (a, b)) for f in compare_runs.result_files(a))


def test_a_changed_value_differs(tmp_path):
    a = _run(tmp_path / "a", 0.75, 1.5, "f00")
    b = _run(tmp_path / "b", 0.7500001, 1.5, "f00")
    assert not compare_runs.same(a / "evaluation/results.parquet", b / "evaluation/results.parquet", (a, b))
    assert not compare_runs.same(a / "evaluation/summary.json", b / "evaluation/summary.json", (a, b))


def test_main_reports_missing_and_differing_files(tmp_path, monkeypatch, capsys):
    a = _run(tmp_path / "a", 0.75, 1.5, "f00")
    b = _run(tmp_path / "b", 0.25, 1.5, "f00")
    (a / "evaluation" / "metrics.md").write_text("| acc |\n")
    monkeypatch.setattr("sys.argv", ["compare_runs.py", str(a), str(b)])
    assert compare_runs.main() == 1
    out = capsys.readouterr().out
    assert f"only in {a}: evaluation/metrics.md" in out and "differs: evaluation/results.parquet" in out
    monkeypatch.setattr("sys.argv", ["compare_runs.py", str(a), str(a)])
    assert compare_runs.main() == 0
