"""Answer extraction and grading: toy exact match, and math-verify under a wall-clock timeout.

Why a separate worker process for math-verify
---------------------------------------------
math-verify's own timeout uses ``signal.alarm``, which works only in the main thread of the main
interpreter: inside a worker thread (a ThreadPoolExecutor, a web server, some notebook
front-ends) it raises. We therefore switch it off (``parse(..., parsing_timeout=None)`` and
``verify(..., timeout_seconds=None)``, the documented way in math_verify/parser.py and
grader.py) and enforce the deadline from outside: each check runs in a long-lived worker
process, and a check that misses its deadline gets the worker killed (a hung sympy call cannot
be interrupted any other way) and returns "timeout". A persistent worker keeps the common path
fast (~ms per check: no process start, the gold's parse is cached), and only a timeout pays for
a fresh start.

The worker is started with ``subprocess`` running this very file as a script (not
``multiprocessing``): no pickling, no re-import of the caller's ``__main__`` (scripts without a
main guard and Jupyter kernels both work), no "daemonic processes are not allowed to have
children" error inside a ``datasets.map(num_proc=...)`` worker, and no import of the
``tsq_utils`` package (so the worker stays light whatever the package grows to import). It talks
JSON lines over stdin/stdout and exits when its stdin closes, so it never outlives its parent.
Several threads may grade at once: each takes its own worker from a small pool.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial

if __package__:
    from tqdm.auto import tqdm

    from .format import THINK_CLOSE as THINK_END
    from .format import answer_part
else:  # run as the math-verify worker script (no package): the worker checks boxed expressions, never whole texts
    THINK_END = answer_part = tqdm = None

STATUSES = ("correct", "wrong", "no_answer", "timeout")
# a fresh worker imports sympy/math-verify and warms up its parser; this bounds that, not a check
WORKER_START_TIMEOUT_S = 120.0

_BOXED = re.compile(r"\\boxed(?![A-Za-z])")
_INT = re.compile(r"[+-]?\d+")

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- extraction


def _boxed_argument(text: str, start: int) -> str | None:
    """The argument of the ``\\boxed`` whose name ends at ``start``; None if unclosed or missing."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # the brace-less form "\boxed 5": one token, up to whitespace or the end of the math
        if i == start:
            return None
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    j = i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2  # an escaped character such as \{ or \} never opens or closes the box
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None  # cut off inside the box (a truncated response)


def extract_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` of the answer part (format.answer_part: docs/method.md)."""
    region = answer_part(text)
    for m in reversed(list(_BOXED.finditer(region))):
        content = _boxed_argument(region, m.end())
        if content is not None:
            return content
    return None


# ----------------------------------------------------------------------------- toy grading


def grade_toy(text: str, gold: str) -> str:
    """Toy-world status: the boxed answer must equal the gold integer string exactly."""
    gold = str(gold).strip()
    if not _INT.fullmatch(gold):
        raise ValueError(f"toy gold must be an integer string, got {gold!r}")
    answer = extract_boxed(text)
    if answer is None or not answer.strip():
        return "no_answer"
    return "correct" if answer.strip() == gold else "wrong"


# ----------------------------------------------------------------------------- math-verify worker


def _serve() -> None:
    """Worker loop: read {"pred", "gold"} JSON lines from stdin, answer {"status"} lines."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" notices
    # imported in the worker only: the package never needs sympy/math-verify in its own process
    from math_verify import parse, verify

    @lru_cache(maxsize=4096)
    def parse_boxed(expr: str) -> list:
        # a graded problem's gold is parsed once, not once per sample
        return parse(expr, parsing_timeout=None)

    def check(pred: str, gold: str) -> str:
        gold_parsed = parse_boxed(gold)
        pred_parsed = parse(pred, parsing_timeout=None)
        if not pred_parsed:
            return "wrong"
        return "correct" if verify(gold_parsed, pred_parsed, timeout_seconds=None) else "wrong"

    # replies own stdout; anything a library prints goes to stderr instead of corrupting them
    out, sys.stdout = sys.stdout, sys.stderr
    check("\\boxed{1}", "\\boxed{\\frac{1}{1}}")  # warm up the LaTeX parser before saying ready
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            status = check(req["pred"], req["gold"])
        except Exception:  # noqa: BLE001 - a verifier crash on odd input means "not verified equal"
            status = "wrong"
        out.write(json.dumps({"status": status}) + "\n")
        out.flush()


class _Worker:
    """One math-verify worker process and the thread that reads its replies."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
            env=env,
            # its own session: a Ctrl-C or a Jupyter "interrupt kernel" aimed at the caller's
            # process group must not kill the worker with a traceback
            start_new_session=True,
        )
        self.replies: queue.Queue = queue.Queue()
        # a reader thread (not select) gives a portable timed read of the reply pipe
        threading.Thread(target=self._read, daemon=True).start()
        try:
            ready = self.replies.get(timeout=WORKER_START_TIMEOUT_S)
        except queue.Empty:
            ready = None
        if not (isinstance(ready, dict) and ready.get("ready")):
            self.close()
            raise RuntimeError(
                f"the math-verify grading worker did not start within {WORKER_START_TIMEOUT_S:.0f} s "
                f"({sys.executable} {__file__} --serve); check that math-verify is installed"
            )

    def _read(self) -> None:
        # this thread owns the reply pipe: it reads to EOF (the process ended) and closes it
        with self.proc.stdout:
            for line in self.proc.stdout:
                try:
                    self.replies.put(json.loads(line))
                except json.JSONDecodeError:
                    logger.warning("grading worker printed a non-reply line: %.200r", line)
        self.replies.put(None)

    def check(self, pred: str, gold: str, timeout_s: float) -> str | None:
        """The worker's status for one check; None if it missed the deadline or died."""
        self.died = False
        try:
            self.proc.stdin.write(json.dumps({"pred": pred, "gold": gold}) + "\n")
            self.proc.stdin.flush()
            reply = self.replies.get(timeout=timeout_s)
            # None here is the reader's end-of-output marker: the worker died before its deadline
            self.died = reply is None
        except queue.Empty:
            reply = None
        except (BrokenPipeError, OSError):
            reply, self.died = None, True
        except BaseException:
            # interrupted (KeyboardInterrupt) mid-check: its late reply would answer the next check
            self.close()
            raise
        if reply is None:
            self.close()
            return None
        return reply["status"]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        try:
            self.proc.stdin.close()
        except OSError:  # a broken pipe to a dead worker
            pass


_IDLE: list[_Worker] = []
_ALL: list[_Worker] = []
_POOL_LOCK = threading.Lock()
_POOL_PID = os.getpid()


def _acquire() -> _Worker:
    global _POOL_PID
    with _POOL_LOCK:
        if os.getpid() != _POOL_PID:
            # a forked child shares its parent's worker pipes; it must start its own workers
            _IDLE.clear()
            _ALL.clear()
            _POOL_PID = os.getpid()
        while _IDLE:
            worker = _IDLE.pop()
            if worker.alive:
                return worker
            # it died while idle (killed, out of memory): its reply queue holds the end-of-output marker,
            # which the next check would take for "no verdict in time"
            if worker in _ALL:
                _ALL.remove(worker)
            worker.close()
    worker = _Worker()  # started outside the lock: a start takes a second or two
    with _POOL_LOCK:
        _ALL.append(worker)
    return worker


def _release(worker: _Worker) -> None:
    with _POOL_LOCK:
        if worker.alive:
            _IDLE.append(worker)
        elif worker in _ALL:
            _ALL.remove(worker)


def shutdown_workers() -> None:
    """Stop every math-verify worker process (they restart on the next grade_math call)."""
    with _POOL_LOCK:
        workers = list(_ALL)
        _ALL.clear()
        _IDLE.clear()
    for worker in workers:
        worker.close()


atexit.register(shutdown_workers)


def _as_boxed(expr: str) -> str:
    """Wrap a bare answer as ``\\boxed{...}`` so math-verify's LaTeX extractor finds all of it."""
    return expr if _BOXED.search(expr) else "\\boxed{" + expr + "}"


# ----------------------------------------------------------------------------- math grading


def grade_math(text: str, gold: str, timeout_s: float = 5.0) -> str:
    """Status (correct/wrong/no_answer/timeout) of the last boxed answer after ``</think>``."""
    gold = str(gold).strip()
    if not gold:
        raise ValueError("gold answer is empty")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    answer = extract_boxed(text)
    if answer is None or not answer.strip():
        return "no_answer"
    for _attempt in range(2):
        worker = _acquire()
        try:
            status = worker.check(_as_boxed(answer.strip()), _as_boxed(gold), timeout_s)
        finally:
            _release(worker)
        if status is not None or not worker.died:
            break
        # the worker died before the deadline (killed from outside, out of memory): one more try on a fresh one
        logger.warning("math-verify worker died during a check; retrying once on a new worker")
    if status is None:
        # a killed hang and a crashed worker (e.g. out of memory) both mean: no verdict in time
        logger.warning("math-verify gave no verdict within %.1f s for answer %.80r", timeout_s, answer)
        return "timeout"
    return status


# The graders by name (a Task's `grader`): (timeout_s) -> the function that grades one completion against its gold.
GRADERS: dict[str, Callable[[float], Callable[[str, str], str]]] = {
    "toy": lambda timeout_s: grade_toy,
    "math": lambda timeout_s: partial(grade_math, timeout_s=timeout_s),
}


def grade_many(texts: Sequence[str], golds: Sequence[str], kind: str, timeout_s: float = 5.0, n_workers: int = 1,
               progress: bool = False) -> list[str]:
    """Statuses of many completions against their golds, by the grader named `kind` (GRADERS)."""
    if len(texts) != len(golds):
        raise ValueError(f"texts and golds differ in length: {len(texts)} vs {len(golds)}")
    if kind not in GRADERS:
        raise ValueError(f"unknown grader {kind!r}: use one of {', '.join(map(repr, GRADERS))}")
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    fn = GRADERS[kind](timeout_s)
    # threads only wait on their own worker process, so n_workers > 1 runs checks in parallel
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        results = pool.map(fn, texts, golds)
        if progress:
            results = tqdm(results, total=len(texts), desc=f"grading ({kind})")
        return list(results)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
