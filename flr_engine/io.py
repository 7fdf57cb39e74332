"""JSONL input with precise errors, and resumable JSONL output.

Every bad input row raises :class:`RowError` naming the file, the 1-based line and the
field. Output is written row by row (flushed and fsynced per batch); on resume, rows
already in the output are skipped and a torn last line (an interrupted write) is dropped,
so nothing that was completely written is ever lost or duplicated.

What an output promises (:class:`ResumableWriter`, used by every command that writes rows):

* it never destroys a file it did not create: an output that resolves (after symlinks) to
  one of the job's inputs is refused, and so is an existing file without this tool's
  metadata sidecar, unless the user passes ``--overwrite``;
* it resumes only the same computation: the sidecar holds the job's settings, the
  flr-engine version and the sha256 of every input file (rows, templates, calibration,
  model weights); any difference stops the run with a message naming it;
* one writer at a time: an exclusive lock keyed on the resolved path.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from flr_engine.errors import ConfigError, FLRError


class RowError(FLRError, ValueError):
    """A bad input row: ``path:line: field: message``."""

    def __init__(self, path: str, line: int, field: str | None, message: str):
        self.path, self.line, self.field, self.message = path, line, field, message
        where = f"{path}:{line}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # picklable (raised in `flr eval --workers` processes)
        return type(self), (self.path, self.line, self.field, self.message)


class InputFileError(FLRError, ValueError):
    """An input file that cannot be read at all (missing, corrupt or truncated compression)."""


class RowErrors(RowError):
    """Every bad row of a file, found before any compute (a RowError whose path, line and
    field are the first one's): the first ``shown`` are listed as ``path:line: field:
    message``, then a count of the rest."""

    def __init__(self, errors: list[RowError], shown: int = 20):
        self.errors = errors
        first = errors[0]
        self.path, self.line, self.field, self.message = (
            first.path, first.line, first.field, first.message
        )  # fmt: skip
        lines = [str(e) for e in errors[:shown]]
        if len(errors) > shown:
            lines.append(f"... and {len(errors) - shown} more bad rows")
        head = f"{len(errors)} bad row{'s' if len(errors) != 1 else ''}"
        ValueError.__init__(
            self, f"{head} (nothing was computed or written):\n  " + "\n  ".join(lines)
        )

    def __reduce__(self):
        return type(self), (self.errors,)


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def scan_jsonl(path: str) -> Iterator[tuple[int, dict | RowError]]:
    """Yield ``(line_number, object)`` for every non-blank line, or ``(line_number,
    RowError)`` for a line that is not a UTF-8 JSON object; never stops at a bad line.
    A missing file or corrupt / truncated compression raises :class:`InputFileError`."""
    import zlib

    if not os.path.exists(path):
        raise InputFileError(f"input file {path} does not exist")
    if os.path.isdir(path):
        raise InputFileError(f"input {path} is a folder, not a JSONL file")
    n = 0
    try:
        with _open(path) as fh:
            for n, raw in enumerate(fh, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    why = f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
                    yield n, RowError(path, n, None, why)
                    continue
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    why = f"malformed JSON: {exc.msg} (column {exc.colno})"
                    yield n, RowError(path, n, None, why)
                    continue
                if not isinstance(obj, dict):
                    why = f"expected a JSON object, got {type(obj).__name__}"
                    yield n, RowError(path, n, None, why)
                    continue
                yield n, obj
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile) and exc.errno:
            raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        raise InputFileError(
            f"{path}: corrupt or truncated compressed file after line {n} "
            f"({exc.__class__.__name__}: {exc})"
        ) from None


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)``; blank lines are skipped; bad lines raise RowError."""
    for n, obj in scan_jsonl(path):
        if isinstance(obj, RowError):
            raise obj
        yield n, obj


def read_rows(
    path: str, parse, on_error: str = "fail", allow_empty: bool | None = None, log=None
) -> tuple[list, list[RowError]]:
    """Validate a whole JSONL(.gz) file before any compute: ``parse(path, line, obj)`` makes
    each row (raising RowError), and every problem is collected. ``on_error="fail"``: raise
    :class:`RowErrors` listing them all; ``"skip"``: drop those rows, ``log`` each, and
    return them. An empty file (no rows at all) is an :class:`InputFileError` unless
    ``allow_empty`` (``None``: the command has no ``--allow-empty`` flag to suggest).
    Returns ``(rows, skipped_errors)``."""
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    rows, errors, seen = [], [], 0
    for line, obj in scan_jsonl(path):
        seen += 1
        try:
            if isinstance(obj, RowError):
                raise obj
            rows.append(parse(path, line, obj))
        except RowError as exc:
            errors.append(exc)
    if errors and on_error == "fail":
        raise RowErrors(errors)
    for exc in errors:
        if log is not None:
            log(f"skipping {exc}")
    if seen == 0 and not allow_empty:
        hint = " (pass --allow-empty if that is expected)" if allow_empty is not None else ""
        raise InputFileError(f"{path}: empty: no rows{hint}")
    return rows, errors


def check_id(path: str, line: int, value: object) -> object:
    """A row id must survive a JSON round trip: a string, an integer or a finite number."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        got = type(value).__name__
        raise RowError(path, line, "id", f"must be a string or a number, got {got}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RowError(path, line, "id", f"must be finite, got {value!r}")
    return value


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
    from flr_engine.chat import InputError, normalize_conversation, normalize_reply

    try:  # the whole row is checked here, in the validation pass, not during compute
        normalize_conversation(obj[keys[0]], keys[0])
        normalize_reply(obj[keys[1]], keys[1])
    except InputError as exc:
        raise RowError(path, line, exc.field, exc.message) from None
    return ScoreRow(line, check_id(path, line, obj.get("id", line)), obj[keys[0]], obj[keys[1]])


class OutputBusyError(FLRError, ValueError):
    """Another process is writing the same output file."""


class OutputConflictError(FLRError, ValueError):
    """The output cannot be written or resumed without losing or mixing data."""


class OutputWriteError(FLRError, ValueError):
    """Writing the output failed part-way (disk full, ...); finished rows are kept."""


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (cached per process by path, size and mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(real, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` all at once: a temporary file in the same folder,
    fsynced, then renamed over it, so a crash leaves the old file or the new, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def input_files(*candidates: str | None) -> list[str]:
    """The candidates that are existing files (built-in template names, hub ids and None
    are not files and carry no content of their own to hash)."""
    return [c for c in candidates if c and os.path.isfile(c)]


def _same_file(a: str, b: str) -> bool:
    """Whether two existing paths name the same file (hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def lock_exclusive(path: str, what: str | None = None):
    """Hold ``<path>.lock`` exclusively (advisory ``flock``, released when the process
    exits) or raise :class:`OutputBusyError` naming ``what`` (default ``path``). No-op
    where ``fcntl`` is missing (Windows)."""
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
            f"{what or path} is being written by another process; wait for it to finish or "
            "write elsewhere"
        ) from None
    return fh


def claim_output_folder(out: str, kind: str, out_flag: str = "--out", earlier: Sequence[str] = ()) -> None:
    """Make ``out`` this tool's output folder for ``kind`` runs (e.g. ``"flr eval"``), or
    refuse: a path that is a file, a folder that cannot be created, or a non-empty folder
    that holds no ``kind`` run (it may be the user's; nothing there is changed, whatever
    ``--overwrite`` says). A run is marked by ``out/.flr-run.json``; a folder holding one of
    the names ``earlier`` counts as a run written before the marker existed."""
    marker = os.path.join(out, ".flr-run.json")
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputConflictError(f"{out_flag} {out} is a file, not a folder: choose a folder")
    try:
        os.makedirs(out, exist_ok=True)
        entries = [e for e in os.listdir(out) if not e.endswith(".lock")]
    except OSError as exc:
        raise OutputConflictError(f"cannot write {out_flag} {out}: {exc}") from None
    ours = False
    if os.path.exists(marker):
        try:
            with open(marker, encoding="utf-8") as fh:
                ours = json.load(fh).get("kind") == kind
        except (OSError, ValueError, AttributeError):
            ours = False
    elif any(os.path.exists(os.path.join(out, name)) for name in earlier):
        ours = True
    if entries and not ours:
        raise OutputConflictError(
            f"{out_flag} {out} is not empty and holds no {kind} run: choose a new or empty "
            "folder (nothing there was changed)"
        )
    if not os.path.exists(marker):
        try:
            atomic_write_text(marker, json.dumps({"kind": kind}))
        except OSError as exc:
            raise OutputConflictError(f"cannot write {out_flag} {out}: {exc}") from None


class ResumableWriter:
    """Append-only JSONL results keyed by input line; knows which lines are done.

    A sidecar ``<output>.meta.json`` records the settings of the run, the flr-engine version
    and the sha256 of each file in ``inputs``; resuming with any difference raises
    :class:`OutputConflictError` instead of mixing incompatible results in one file. An
    existing non-empty output without a readable sidecar is not resumed and not replaced
    (it may be the user's own file) unless ``resume=False`` (``--overwrite``); an output
    that is one of ``inputs`` is always refused. While open, the writer holds
    ``<output>.lock`` (on the resolved path): a second process on the same output, by any
    name, gets :class:`OutputBusyError`. ``out_flag`` names the output option in messages.
    """

    def __init__(
        self,
        path: str,
        settings: dict,
        resume: bool = True,
        out_flag: str = "--output",
        inputs: Iterable[str] = (),
    ):
        from flr_engine import __version__

        self.path = path
        self.out_flag = out_flag
        real = os.path.realpath(path)
        for src in inputs:
            if os.path.realpath(src) == real or _same_file(src, real):
                raise OutputConflictError(
                    f"{out_flag} {path} is the input file {src}: refusing to overwrite an "
                    f"input; choose another {out_flag}"
                )
        if os.path.isdir(real):
            raise OutputConflictError(f"cannot write {out_flag} {path}: it is a folder; name a file")
        if os.path.isfile(real) and os.stat(real).st_nlink > 1:
            # another name for the same bytes (a hard link): the input check and the lock
            # work by resolved name, so neither could protect it
            raise OutputConflictError(
                f"{out_flag} {path} is a file with {os.stat(real).st_nlink} hard links (other "
                f"names for the same bytes, maybe an input): refusing to write it; choose "
                f"another {out_flag}"
            )
        self.meta_path = real + ".meta.json"
        self.done: set[int] = set()
        self.settings = {
            **settings,
            "flr_engine_version": __version__,
            "input_sha256": {os.path.abspath(p): file_sha256(p) for p in inputs},
        }
        try:
            os.makedirs(os.path.dirname(real), exist_ok=True)
            self._lock = lock_exclusive(real)
        except OSError as exc:  # permissions, a file where a folder should be, /proc, ...
            raise OutputConflictError(f"cannot write {out_flag} {path}: {exc}") from None
        try:
            if resume and os.path.exists(real) and os.path.getsize(real) > 0:
                self._check_settings(self.settings)
                self._load_done()
            else:  # a new output, an empty one, or --overwrite: start over
                open(real, "w").close()
            atomic_write_text(self.meta_path, json.dumps(self.settings, indent=1, sort_keys=True))
            self._fh = open(real, "a", encoding="utf-8")
        except OSError as exc:
            self._release()
            raise OutputConflictError(f"cannot write {out_flag} {path}: {exc}") from None
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    def _check_settings(self, settings: dict) -> None:
        try:
            with open(self.meta_path, encoding="utf-8") as fh:
                old = json.load(fh)
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            why = "is missing" if isinstance(exc, FileNotFoundError) else f"is unreadable ({exc})"
            raise OutputConflictError(
                f"{self.path} exists but its metadata {self.meta_path} {why}: it is not an "
                f"output this tool can resume (it may be your own file). Choose another "
                f"{self.out_flag}, or pass --overwrite to replace it"
            ) from None
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        diff |= {k: (v, None) for k, v in old.items() if k not in settings}
        if diff:
            lines = "; ".join(_describe(k, a, b) for k, (a, b) in sorted(diff.items()))
            raise OutputConflictError(
                f"{self.path} was written by a different computation ({lines}); resuming would "
                f"mix results. Use another {self.out_flag}, or --overwrite to start over"
            )

    def _load_done(self) -> None:
        rows, good = _complete_rows(self.path)
        self.done.update(rows)
        if good != os.path.getsize(self.path):
            with open(self.path, "r+b") as fh:
                fh.truncate(good)

    def write(self, rows: list[dict]) -> None:
        """Append ``rows`` and make them durable (flush + fsync) before returning. A failed
        write (disk full, ...) raises :class:`OutputWriteError`; what was written before
        stays readable, and a torn last line is dropped on resume."""
        try:
            for r in rows:
                self._fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise OutputWriteError(
                f"writing {self.path} failed ({exc.strerror or exc}); the rows written before "
                "are kept: free the space and rerun the same command to resume"
            ) from exc
        self.done.update(int(r["line"]) for r in rows)

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:  # the buffered tail of a failed write: dropped as a torn line on resume
            pass
        finally:
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _complete_rows(path: str) -> tuple[dict[int, dict], int]:
    """The rows of a :class:`ResumableWriter` output up to its first torn or unreadable
    line, keyed by ``"line"``, and the byte length of that complete part."""
    rows: dict[int, dict] = {}
    good = 0
    with open(path, "rb") as fh:
        data = fh.read()
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break  # torn last write
        if raw.strip():
            try:
                row = json.loads(raw)
                rows[int(row["line"])] = row
            except (ValueError, KeyError, TypeError):
                break
        good += len(raw)
    return rows, good


def read_output_rows(path: str) -> dict[int, dict]:
    """The complete rows of an output written by :class:`ResumableWriter` (``flr score``,
    ``flr eval``'s per-set files, ...), keyed by input line; a torn last line (a run still
    writing, or killed) is left out. A missing file has no rows."""
    return _complete_rows(path)[0] if os.path.exists(path) else {}


def _describe(key: str, old: object, new: object) -> str:
    """One settings difference, readable: changed input files are named, not dumped."""
    if key == "input_sha256" and isinstance(old, dict) and isinstance(new, dict):
        changed = [p for p in new if p in old and old[p] != new[p]]
        added = [p for p in new if p not in old]
        gone = [p for p in old if p not in new]
        parts = [f"{p} changed since" for p in changed]
        parts += [f"{p} is new" for p in added] + [f"{p} no longer an input" for p in gone]
        return "input files: " + ", ".join(parts)
    return f"{key}: {old!r} -> {new!r}"
