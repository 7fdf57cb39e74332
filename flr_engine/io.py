"""JSONL input with precise errors, and resumable JSONL output.

Every bad input row raises :class:`RowError` naming the file, the 1-based line and the
field. Output is written row by row (flushed and fsynced per batch); on resume, rows
already in the output are skipped and a torn last line (an interrupted write) is dropped,
so nothing that was completely written is ever lost or duplicated.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass


class RowError(ValueError):
    """A bad input row: ``path:line: field: message``."""

    def __init__(self, path: str, line: int, field: str | None, message: str):
        self.path, self.line, self.field, self.message = path, line, field, message
        where = f"{path}:{line}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # picklable (raised in `flr eval --workers` processes)
        return type(self), (self.path, self.line, self.field, self.message)


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)``; blank lines are skipped; bad lines raise RowError."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file {path} does not exist")
    with _open(path) as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RowError(
                    path, n, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RowError(
                    path, n, None, f"malformed JSON: {exc.msg} (column {exc.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise RowError(path, n, None, f"expected a JSON object, got {type(obj).__name__}")
            yield n, obj


@dataclass
class ScoreRow:
    line: int
    id: object
    context: object
    response: object


def parse_score_row(path: str, line: int, obj: dict) -> ScoreRow:
    """Accept ``{"context", "response"}`` or TRL-style ``{"prompt", "completion"}``."""
    if "context" in obj or "response" in obj:
        keys = ("context", "response")
    elif "prompt" in obj or "completion" in obj:
        keys = ("prompt", "completion")
    else:
        raise RowError(
            path, line, None, "row needs 'context' + 'response' or 'prompt' + 'completion'"
        )
    for k in keys:
        if k not in obj:
            raise RowError(path, line, k, "missing")
    return ScoreRow(line, obj.get("id", line), obj[keys[0]], obj[keys[1]])


class OutputBusyError(ValueError):
    """Another process is writing the same output file."""


def _lock_exclusive(path: str):
    """Hold ``<path>.lock`` exclusively (advisory ``flock``, released when the process
    exits) or raise :class:`OutputBusyError`. No-op where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    fh = open(path + ".lock", "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise OutputBusyError(
            f"{path} is being written by another process; wait for it to finish or write "
            "elsewhere"
        ) from None
    return fh


class ResumableWriter:
    """Append-only JSONL results keyed by input line; knows which lines are done.

    A sidecar ``<output>.meta.json`` records the settings of the run; resuming with other
    settings raises instead of mixing incompatible results in one file. While open, the
    writer holds ``<output>.lock``: a second process on the same output gets
    :class:`OutputBusyError` instead of appending the same lines twice. ``out_flag`` is the
    command-line option that names the output, for the hint in the settings error.
    """

    def __init__(self, path: str, settings: dict, resume: bool = True, out_flag: str = "--output"):
        self.path = path
        self.out_flag = out_flag
        self.meta_path = path + ".meta.json"
        self.done: set[int] = set()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = _lock_exclusive(path)
        try:
            if resume and os.path.exists(path):
                self._check_settings(settings)
                self._load_done()
            else:
                open(path, "w").close()
            with open(self.meta_path, "w") as fh:
                json.dump(settings, fh, indent=1, sort_keys=True)
            self._fh = open(path, "a", encoding="utf-8")
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    def _check_settings(self, settings: dict) -> None:
        if not os.path.exists(self.meta_path):
            return
        with open(self.meta_path) as fh:
            old = json.load(fh)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{self.path} was written with other settings ({lines}); use another {self.out_flag} "
                "or --overwrite"
            )

    def _load_done(self) -> None:
        with open(self.path, "rb") as fh:
            data = fh.read()
        good = 0
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break  # torn last write
            try:
                self.done.add(int(json.loads(raw)["line"]))
            except (ValueError, KeyError, TypeError):
                break
            good += len(raw)
        if good != len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(good)

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            self._fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            self.done.add(int(r["line"]))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
