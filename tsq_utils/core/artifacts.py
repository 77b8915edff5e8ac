"""Atomic artifact IO under a run folder: text, JSON, Parquet tables, JSONL logs, folders, hashes, versions."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from pandas.api import types as ptypes

# Packages whose versions every manifest records (distribution names).
VERSIONED_PACKAGES = ("torch", "transformers", "trl", "datasets", "tokenizers")

_CHUNK = 1 << 20

# mkstemp creates files readable by the owner only; artifacts get the usual umask-based mode instead.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def _json_default(obj: Any) -> Any:
    """Convert the non-JSON types that artifacts commonly hold (paths, NumPy scalars, dataclasses)."""
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    # NumPy scalars and arrays (and torch tensors) expose item()/tolist(); avoid importing numpy here.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON: {obj!r}")


def to_json(obj: Any, indent: int | None = 2) -> str:
    """Serialise to strict JSON (no NaN/Infinity); paths, sets, dataclasses and NumPy values are converted."""
    try:
        return json.dumps(obj, indent=indent, default=_json_default, allow_nan=False, ensure_ascii=False)
    except ValueError as e:
        # json's own message ("Out of range float values...") does not say what to do.
        raise ValueError(f"cannot write NaN or infinity to JSON (replace it with None first): {e}") from e


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync it and rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so the final os.replace is a rename within one file system (atomic on POSIX).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _FILE_MODE)
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text to `path` atomically (readers see the old file or the new one, never a partial one)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text expects a str, got {type(text).__name__}")
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write an object as strict JSON to `path` atomically."""
    return atomic_write_text(path, to_json(obj, indent) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a file that is not valid JSON raises ValueError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text: {e.reason})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from e


def save_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Save a DataFrame as Parquet atomically (index and dtypes survive the round trip)."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"save_table expects a pandas DataFrame, got {type(df).__name__}")
    path = Path(path)
    if path.suffix != ".parquet":
        raise ValueError(f"{path}: table files must end in .parquet")
    with atomic_open(path, "wb") as f:
        df.to_parquet(f)
    return path


def load_table(path: str | os.PathLike) -> pd.DataFrame:
    """Load a Parquet table written by save_table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such table")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path} is not a readable Parquet table (truncated or overwritten?): {e}") from e


def table_rows(path: str | os.PathLike) -> int:
    """Number of rows of a Parquet table, read from its footer (the table itself is not loaded)."""
    path = Path(path)
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable Parquet table (truncated or overwritten?): {e}") from e


def _records(records: Mapping | Iterable[Mapping]) -> list[Mapping]:
    """One record or an iterable of records, as a list of mappings."""
    if isinstance(records, Mapping):
        return [records]
    out = list(records)
    for i, r in enumerate(out):
        if not isinstance(r, Mapping):
            raise TypeError(f"JSONL record {i} is a {type(r).__name__}, expected a dict")
    return out


def _jsonl_lines(records: list[Mapping]) -> str:
    """Records as JSON lines, one per record, each ending with a newline."""
    return "".join(to_json(r, indent=None) + "\n" for r in records)


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping]) -> Path:
    """Write records as a JSONL file atomically (replacing any old file)."""
    return atomic_write_text(path, _jsonl_lines(_records(records)))


def append_jsonl(path: str | os.PathLike, records: Mapping | Iterable[Mapping]) -> Path:
    """Append one record or several to a JSONL log (a growing log: each call writes whole lines)."""
    path = Path(path)
    text = _jsonl_lines(_records(records))  # serialise first, so a bad record writes nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file into a list of dicts (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from e
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path`, on error it is removed.

    The swap is two renames (old folder aside, new folder in), so between them `path` is briefly
    absent; it is never half-written. Temp names are unique, so two writers of the same folder never
    share one: the last to finish wins, and neither fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one stat, not exists() then is_dir(): another writer may move the folder aside between two calls
    try:
        is_dir = stat.S_ISDIR(path.stat().st_mode)
    except FileNotFoundError:
        is_dir = True
    if not is_dir:
        raise NotADirectoryError(f"{path} exists and is not a folder")
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{tag}"
    try:
        for _ in range(100):
            # Another writer may move its own folder in between our two renames: then the second rename
            # finds a non-empty folder (ENOTEMPTY/EEXIST) and we move that one aside too and retry.
            with contextlib.suppress(FileNotFoundError):
                if old.exists():
                    shutil.rmtree(old)
                os.replace(path, old)
            try:
                os.replace(tmp, path)
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        else:
            raise OSError(f"{path}: could not move the new folder in (another process keeps replacing it)")
    except BaseException:
        if old.exists() and not path.exists():  # put the previous version back
            with contextlib.suppress(OSError):
                os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# atomic_dir's temporary folders: .<name>.tmp-<pid>-<8 hex> (being written) and .<name>.old-<pid>-<8 hex> (moved aside)
_LEFTOVER = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    """True when a process with this id runs (or may: one we may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders atomic_dir left in `folder` when its process was killed (SIGKILL, OOM): those
    whose writer's process is gone. A live writer's folders are left alone. Returns what was removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
    return removed


class SchemaError(ValueError):
    """A table lacks a column its schema (core/pipeline.SCHEMAS) declares, or holds it with another type."""


def check_table(path: str | os.PathLike, columns: dict[str, str], df: pd.DataFrame | None = None) -> None:
    """SchemaError naming the file and the column unless the table (read from `path` unless `df` is given) has every
    declared column with its kind ("str", "int", "float", "bool"); an empty table is checked for its columns only."""
    path = Path(path)
    if df is None:
        df = load_table(path)
    checks = {"str": lambda s: ptypes.is_string_dtype(s)
              or (ptypes.is_object_dtype(s) and all(isinstance(v, str) for v in s)),
              "int": lambda s: ptypes.is_integer_dtype(s) and not ptypes.is_bool_dtype(s),
              "float": lambda s: ptypes.is_numeric_dtype(s) and not ptypes.is_bool_dtype(s),
              "bool": ptypes.is_bool_dtype}
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SchemaError(f"{path}: column {missing[0]!r} is missing (the table has {list(df.columns)[:12]}); "
                          "rerun the notebook that writes it")
    if len(df) == 0:
        return
    for col, kind in columns.items():
        if not checks[kind](df[col]):
            raise SchemaError(f"{path}: column {col!r} holds {df[col].dtype}, not {kind}; the table was not written "
                              "by this pipeline's code: rerun the notebook that writes it")


class CorruptWeightsError(ValueError):
    """A safetensors file that is truncated or not safetensors; the message names the file."""


def check_safetensors(path: str | os.PathLike) -> None:
    """CorruptWeightsError naming the file unless it is a whole safetensors file: an 8-byte header length, a JSON
    header, and tensor data that ends exactly where the file does (a truncated copy ends early). Reads the header
    only."""
    path = Path(path)
    size = path.stat().st_size
    fix = "restore it (git checkout for the shipped reasoner), or rerun the notebook that wrote it"
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, too short for a header")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError(f"its header claims {n} bytes, past the end of the file ({size} bytes)")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) != size:
            raise ValueError(f"its tensors need {8 + n + max(ends, default=0)} bytes, the file has {size}")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise CorruptWeightsError(f"{path} is not a whole safetensors file ({e}): truncated or damaged; "
                                  f"{fix}") from None


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dir_hash(path: str | os.PathLike, file_sha: Callable[[Path], str] | None = None) -> str:
    """SHA-256 (hex) of a folder: its files' relative paths and contents (file_sha of each, default file_hash), in
    sorted order.

    Independent of timestamps and listing order; empty sub-folders do not count.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    h = hashlib.sha256()
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    for p in files:
        # NUL and newline cannot both appear in a path, so entries cannot run into each other.
        h.update(f"{p.relative_to(root).as_posix()}\0{(file_sha or file_hash)(p)}\n".encode())
    return h.hexdigest()


def path_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file (file_hash) or of a folder (dir_hash)."""
    path = Path(path)
    if path.is_dir():
        return dir_hash(path)
    if path.is_file():
        return file_hash(path)
    raise FileNotFoundError(f"{path}: no such file or folder")


def package_versions() -> dict[str, str | None]:
    """Versions of Python and the pinned libraries (None for one that is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
