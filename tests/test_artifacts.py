"""Atomic IO, tables, JSONL logs, atomic folders, hashes and version records."""

import hashlib
import json
import math
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tsq_utils.core.artifacts import (
    append_jsonl,
    atomic_dir,
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    dir_hash,
    file_hash,
    load_table,
    package_versions,
    path_hash,
    read_json,
    read_jsonl,
    save_table,
    write_jsonl,
)


def leftovers(folder: Path) -> list[str]:
    """Hidden temp files/folders that an atomic write would leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_text_creates_parents_and_replaces(tmp_path):
    p = tmp_path / "a" / "b" / "note.txt"
    assert atomic_write_text(p, "first") == p
    atomic_write_text(p, "second ü")
    assert p.read_text(encoding="utf-8") == "second ü"
    assert leftovers(p.parent) == []


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    p = tmp_path / "x.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write("half of the new conte")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_write_text_rejects_non_str(tmp_path):
    with pytest.raises(TypeError, match="expects a str"):
        atomic_write_text(tmp_path / "x", b"bytes")


def test_atomic_write_json_converts_common_types(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"path": Path("runs/toy"), "n": np.int64(3), "x": np.float32(0.5), "v": np.arange(3),
                          "s": {2, 1}})
    assert read_json(p) == {"path": "runs/toy", "n": 3, "x": 0.5, "v": [0, 1, 2], "s": [1, 2]}
    assert p.read_text().endswith("}\n")


def test_atomic_write_json_rejects_nan_and_unknown_objects(tmp_path):
    p = tmp_path / "m.json"
    with pytest.raises(ValueError, match="NaN"):
        atomic_write_json(p, {"acc": math.nan})
    with pytest.raises(TypeError, match="object"):
        atomic_write_json(p, {"o": object()})
    assert not p.exists() and leftovers(tmp_path) == []


def test_table_round_trip_keeps_dtypes_and_index(tmp_path):
    df = pd.DataFrame(
        {
            "problem_id": ["p1", "p2", "p3"],
            "k": [2, 5, 8],
            "correct": [True, False, True],
            "p": [0.25, 0.5, 1.0],
        },
        index=pd.Index([10, 20, 30], name="row"),
    )
    path = save_table(df, tmp_path / "t" / "samples.parquet")
    back = load_table(path)
    pd.testing.assert_frame_equal(back, df)
    assert leftovers(path.parent) == []


def test_table_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.parquet"):
        save_table(pd.DataFrame({"a": [1]}), tmp_path / "t.csv")
    with pytest.raises(TypeError, match="DataFrame"):
        save_table([{"a": 1}], tmp_path / "t.parquet")
    with pytest.raises(FileNotFoundError, match="no such table"):
        load_table(tmp_path / "missing.parquet")


def test_jsonl_write_append_read(tmp_path):
    p = tmp_path / "log.jsonl"
    write_jsonl(p, [{"step": 0, "kl": 0.1}, {"step": 1, "kl": 0.2}])
    append_jsonl(p, {"step": 2, "kl": 0.3})
    append_jsonl(p, [{"step": 3}, {"step": 4}])
    assert [r["step"] for r in read_jsonl(p)] == [0, 1, 2, 3, 4]
    assert p.read_text().count("\n") == 5
    write_jsonl(p, [{"only": True}])  # write replaces
    assert read_jsonl(p) == [{"only": True}]


def test_append_jsonl_bad_record_writes_nothing(tmp_path):
    p = tmp_path / "log.jsonl"
    append_jsonl(p, {"a": 1})
    with pytest.raises(ValueError, match="NaN"):
        append_jsonl(p, [{"a": 2}, {"a": math.nan}])
    with pytest.raises(TypeError, match="record 1"):
        append_jsonl(p, [{"a": 2}, [1, 2]])
    assert read_jsonl(p) == [{"a": 1}]


def test_read_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n')
    with pytest.raises(ValueError, match="line 4"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_atomic_dir_success_replaces_old_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "weights.bin").write_bytes(b"v1")
        (d / "old_only.txt").write_text("x")
        assert not target.exists()  # nothing visible until the block succeeds
    assert (target / "weights.bin").read_bytes() == b"v1"
    with atomic_dir(target) as d:
        (d / "weights.bin").write_bytes(b"v2")
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    assert (target / "weights.bin").read_bytes() == b"v2"
    assert leftovers(tmp_path) == []


def test_atomic_dir_error_keeps_old_and_cleans_up(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "weights.bin").write_bytes(b"v1")
    with pytest.raises(KeyError):
        with atomic_dir(target) as d:
            (d / "weights.bin").write_bytes(b"half")
            raise KeyError("crash")
    assert (target / "weights.bin").read_bytes() == b"v1"
    assert leftovers(tmp_path) == []
    with pytest.raises(KeyError):
        with atomic_dir(tmp_path / "fresh") as d:
            raise KeyError("crash")
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path) == []


def test_atomic_dir_refuses_a_file_target(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        with atomic_dir(tmp_path / "f"):
            pass


def test_file_hash_is_sha256(tmp_path):
    p = tmp_path / "abc"
    p.write_bytes(b"abc")
    assert file_hash(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = tmp_path / "big"
    data = bytes(range(256)) * 9000  # several read chunks
    big.write_bytes(data)
    assert file_hash(big) == hashlib.sha256(data).hexdigest()


def test_dir_hash_closed_form_and_stability(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "x.txt").write_bytes(b"abc")
    (a / "sub" / "y.txt").write_bytes(b"")
    hx, hy = hashlib.sha256(b"abc").hexdigest(), hashlib.sha256(b"").hexdigest()
    expected = hashlib.sha256(f"sub/y.txt\0{hy}\nx.txt\0{hx}\n".encode()).hexdigest()
    assert dir_hash(a) == expected
    # same content written in another order, plus an empty folder: same hash
    b = tmp_path / "b"
    (b / "empty").mkdir(parents=True)
    (b / "x.txt").write_bytes(b"abc")
    (b / "sub").mkdir()
    (b / "sub" / "y.txt").write_bytes(b"")
    assert dir_hash(b) == expected
    (b / "sub" / "y.txt").rename(b / "sub" / "z.txt")  # a rename changes it
    assert dir_hash(b) != expected
    assert path_hash(a) == expected and path_hash(a / "x.txt") == hx
    with pytest.raises(FileNotFoundError):
        path_hash(tmp_path / "nope")
    with pytest.raises(NotADirectoryError):
        dir_hash(a / "x.txt")


def test_package_versions():
    v = package_versions()
    assert list(v) == ["python", "torch", "transformers", "trl", "datasets", "tokenizers"]
    assert v["python"] == platform.python_version()
    import torch

    assert v["torch"] == torch.__version__
    json.dumps(v)


def test_no_pickle_in_artifacts():
    src = (Path(__file__).resolve().parent.parent / "tsq_utils" / "core" / "artifacts.py").read_text()
    assert "pickle" not in src


def test_atomic_dir_refuses_a_file_and_leaves_it(tmp_path):
    from tsq_utils.core.artifacts import atomic_dir

    f = tmp_path / "model"
    f.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        with atomic_dir(f) as d:
            (d / "x").write_text("y")
    assert f.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(tmp_path / "new") as d:  # an absent folder is simply created
        (d / "x").write_text("y")
    assert (tmp_path / "new" / "x").read_text() == "y"


def test_a_truncated_safetensors_file_is_named(tmp_path):
    """Issue 26: a truncated model.safetensors gave a bare SafetensorError naming no file."""
    import shutil as _shutil

    from tsq_utils.core.artifacts import CorruptWeightsError, check_safetensors
    from tsq_utils.core.config import REPO_ROOT

    src = REPO_ROOT / "checkpoints" / "toy-reasoner" / "model.safetensors"
    check_safetensors(src)
    bad = tmp_path / "model.safetensors"
    _shutil.copy(src, bad)
    with open(bad, "r+b") as f:
        f.truncate(src.stat().st_size - 100)
    with pytest.raises(CorruptWeightsError, match=r"model.safetensors is not a whole safetensors file \(its tensors "
                                                  r"need \d+ bytes, the file has \d+\): truncated"):
        check_safetensors(bad)
    bad.write_bytes(b"abc")
    with pytest.raises(CorruptWeightsError, match="too short for a header"):
        check_safetensors(bad)
