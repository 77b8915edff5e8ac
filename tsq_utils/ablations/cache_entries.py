"""A cache entry on disk: its meta.json and the sha256 of each file, verified on every reuse; listing, verifying and
pruning a cache folder (`python -m tsq_utils.ablations.cache list|verify|prune`, by age, by code, to a size)."""

from __future__ import annotations

import argparse
import math
import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from ..core import config, pipeline
from ..core.artifacts import SchemaError, check_table, file_hash, read_json
from .cache_keys import package_hash

CACHE_META = "meta.json"  # each entry's record: payload, source, seconds, headline numbers
TWINS = "twins"  # cache/twins/<key>: the model entry trained on this content with these settings


def entry_files(path: Path) -> dict[str, str]:
    """{file relative to the entry: sha256} of every file of a cache entry but its meta.json."""
    path = Path(path)
    return {p.relative_to(path).as_posix(): file_hash(p)
            for p in sorted(path.rglob("*")) if p.is_file() and p.relative_to(path).as_posix() != CACHE_META}


# (entry file, inode, size, mtime) -> sha256: an unchanged file is not hashed twice in a session
_VERIFIED: dict[tuple, str] = {}


def hash_once(p: Path) -> str:
    """A file's sha256, hashed once per session while its inode, size and mtime stay the same."""
    st = p.stat()
    sig = (str(p), st.st_ino, st.st_size, st.st_mtime_ns)
    if sig not in _VERIFIED:
        _VERIFIED[sig] = file_hash(p)
    return _VERIFIED[sig]


def verify_entry(path: Path) -> list[str]:
    """What is wrong with a cache entry (empty when it verifies): its meta.json must record the sha256 of its files
    and every file must still have it, none missing and none added."""
    path = Path(path)
    try:
        meta = read_json(path / CACHE_META)
    except (OSError, ValueError) as e:
        return [f"{CACHE_META} is missing or unreadable ({type(e).__name__})"]
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        return [f"{CACHE_META} records no file hashes (written by an older version)"]
    problems = []
    present = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
    present.pop(CACHE_META, None)
    for name, sha in sorted(files.items()):
        if name not in present:
            problems.append(f"{name} is missing")
        elif hash_once(present[name]) != sha:
            problems.append(f"{name} changed (sha256 differs from {CACHE_META})")
    problems += [f"{name} is not part of the entry" for name in sorted(set(present) - set(files))]
    if not problems:  # the files are the ones recorded: their columns must still be what later stages read
        for name, p in sorted(present.items()):
            columns = pipeline.schema(None, Path(name).name) if name.endswith(".parquet") else None
            if columns:
                try:
                    check_table(p, columns)
                except SchemaError as e:
                    problems.append(f"{name}: {str(e).split(': ', 1)[1]}")
    return problems



# --------------------------------------------------------------------------- listing, verifying and pruning


def entries(cache_dir: str | os.PathLike) -> list[dict]:
    """The entries of a cache folder, oldest first: key, kind, source, bytes, finished_at, code (the package hash
    they were computed with) and whether it is today's code."""
    cache_dir = Path(cache_dir)
    out = []
    if not cache_dir.is_dir():
        return out
    today = package_hash()
    for d in sorted(cache_dir.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or d.name == TWINS:
            continue
        try:
            meta = read_json(d / CACHE_META)
        except (OSError, ValueError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        out.append({"key": d.name, "kind": (meta.get("payload") or {}).get("kind", "?"),
                    "source": meta.get("source", "?"), "bytes": size, "finished_at": meta.get("finished_at", ""),
                    "code": meta.get("code"), "current_code": meta.get("code") == today, "path": d})
    return sorted(out, key=lambda e: (e["finished_at"], e["key"]))


def verify(cache_dir: str | os.PathLike, remove: bool = False) -> dict[str, list[str]]:
    """{key: problems} of the entries that do not verify (verify_entry); with remove=True they are deleted, so the
    next run of notebook 06 recomputes them (a run recomputes an entry that fails verification anyway)."""
    bad = {}
    for e in entries(cache_dir):
        problems = verify_entry(e["path"])
        if problems:
            bad[e["key"]] = problems
            if remove:
                shutil.rmtree(e["path"], ignore_errors=True)
    return bad


def _parse_size(text: str) -> int:
    """'500M', '2G', '10k' or bytes -> bytes."""
    t = str(text).strip().upper().removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise ValueError(f"size {text!r}: give bytes or a number with K, M, G or T (500M)") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"size {text!r} must be a non-negative number")
    return int(value * mult)


def prune(cache_dir: str | os.PathLike, older_than_days: float | None = None, stale_code: bool = False,
          max_bytes: int | None = None, dry_run: bool = False) -> list[dict]:
    """Remove entries: finished more than `older_than_days` ago, computed by other code than today's (`stale_code`:
    they can no longer be hit, since every key covers the code), and then the oldest until the cache holds at most
    `max_bytes`. Returns the removed entries (with dry_run, those that would be)."""
    now = datetime.now(timezone.utc)
    keep, gone = [], []
    for e in entries(cache_dir):
        try:
            age_days = (now - datetime.fromisoformat(e["finished_at"])).total_seconds() / 86400
        except (TypeError, ValueError):
            age_days = math.inf
        if (older_than_days is not None and age_days > older_than_days) or (stale_code and not e["current_code"]):
            gone.append(e)
        else:
            keep.append(e)
    if max_bytes is not None:
        total = sum(e["bytes"] for e in keep)
        while keep and total > max_bytes:
            e = keep.pop(0)  # the oldest first
            total -= e["bytes"]
            gone.append(e)
    if not dry_run:
        for e in gone:
            shutil.rmtree(e["path"], ignore_errors=True)
        twins = Path(cache_dir) / TWINS
        if twins.is_dir():  # twin records that name a removed entry
            for t in twins.iterdir():
                if t.is_file() and not (Path(cache_dir) / t.read_text().strip()).is_dir():
                    t.unlink(missing_ok=True)
    return gone


def _human(n: float) -> str:
    """A byte count as ls -h prints it (512B, 1.5K, 2.0G)."""
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def main(argv: Sequence[str] | None = None) -> int:
    """python -m tsq_utils.ablations.cache list|verify|prune [--profile NAME | --cache DIR] ..."""
    ap = argparse.ArgumentParser(prog="python -m tsq_utils.ablations.cache",
                                 description="List, verify or prune notebook 06's ablation cache.")
    ap.add_argument("command", choices=("list", "verify", "prune"))
    ap.add_argument("--profile", default=os.environ.get("TSQ_PROFILE", "toy"),
                    help="whose cache: runs/<profile>/ablations/cache (default: toy)")
    ap.add_argument("--cache", help="a cache folder instead of the profile's")
    ap.add_argument("--remove", action="store_true", help="verify: delete the entries that fail (recomputed by 06)")
    ap.add_argument("--older-than", type=float, metavar="DAYS", help="prune: entries finished more than DAYS ago")
    ap.add_argument("--stale-code", action="store_true",
                    help="prune: entries computed by other code than today's (their keys can no longer be hit)")
    ap.add_argument("--max-size", metavar="SIZE", help="prune: then the oldest until the cache holds at most SIZE "
                                                        "(bytes, or 500M, 2G)")
    ap.add_argument("--dry-run", action="store_true", help="prune: say what would go, remove nothing")
    a = ap.parse_args(argv)
    cache_dir = Path(a.cache) if a.cache else config.runs_root() / a.profile / "ablations" / "cache"
    if not cache_dir.is_dir():
        print(f"no cache at {cache_dir}")
        return 0 if a.command != "verify" else 0
    if a.command == "list":
        es = entries(cache_dir)
        for e in es:
            print(f"{e['key']}  {e['kind']:<8} {_human(e['bytes']):>7}  {e['finished_at'] or '?':<25}  "
                  f"{'today' if e['current_code'] else 'other'} code  {e['source']}")
        print(f"{len(es)} entries, {_human(sum(e['bytes'] for e in es))} in {cache_dir}")
        return 0
    if a.command == "verify":
        bad = verify(cache_dir, remove=a.remove)
        n = len(entries(cache_dir)) + (len(bad) if a.remove else 0)
        for key, problems in bad.items():
            print(f"{key}: {'; '.join(problems)}" + (" (removed)" if a.remove else ""))
        print(f"{n - len(bad)} of {n} entries verify" + (
            "" if not bad else ("; the failed ones were removed: notebook 06 recomputes them" if a.remove else
                                "; notebook 06 recomputes them on its next run (or --remove them now)")))
        return 1 if bad and not a.remove else 0
    if a.older_than is None and not a.stale_code and a.max_size is None:
        ap.error("prune needs --older-than DAYS, --stale-code or --max-size SIZE")
    try:
        max_bytes = None if a.max_size is None else _parse_size(a.max_size)
    except ValueError as e:
        ap.error(str(e))
    gone = prune(cache_dir, a.older_than, a.stale_code, max_bytes, a.dry_run)
    for e in gone:
        print(f"{'would remove' if a.dry_run else 'removed'} {e['key']} ({e['kind']}, {_human(e['bytes'])}, "
              f"{e['finished_at'] or '?'})")
    print(f"{len(gone)} entries {'would be ' if a.dry_run else ''}removed, "
          f"{_human(sum(e['bytes'] for e in gone))} freed")
    return 0
