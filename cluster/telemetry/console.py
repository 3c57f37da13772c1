"""The driver's console during a run: what tells the user something, not what libraries mutter.

While a run is open, `quiet_console(log_path)` wraps the driver's stdout and stderr line by line.
Every line goes to `log_path` (RUN_DIR/console.log, the whole console with nothing dropped); the
console shows all of them except the library chatter a user cannot act on:

* Python warnings from libraries (`FutureWarning: torch.distributed.reduce_op ...` and the
  `warnings.warn(` source line after it), and Ray's log de-duplication banner;
* INFO / WARNING / DEBUG log records that Ray forwards from the actors (vLLM's engine start-up,
  Triton's CPU backend, NUMA binding, torch), recognised by Ray's `(Actor pid=N)` prefix, and Ray's
  own INFO records in the driver ("Started a local Ray instance").

Errors, tracebacks and everything the driver itself prints (the plan, the progress bar, results)
stay on the console. Ray prints actor output with `print(..., file=sys.stderr)` resolved at call
time, which is why wrapping the two streams catches it.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ACTOR_PREFIX = re.compile(r"^\((?P<who>[^()]*?pid=\d+[^()]*)\)\s?")
_WARNING_LINE = re.compile(r"\b[A-Z][A-Za-z]*Warning: ")
_WARN_SOURCE = re.compile(r"^\s*warnings\.warn\(")
_RAY_DEDUP = re.compile(r"\[repeated \d+x across cluster\]|Ray deduplicates logs by default|RAY_DEDUP_LOGS")
# A log record: vLLM "INFO 12-01 20:36:19 [file.py:12] ...", logging "WARNING:name:..." or
# "[2026-12-01 20:36:19,942 W 123 123] file.cc:210: ..." (glog), or "2026-12-01 20:36:19,942\tINFO ...".
_LOG_LEVEL = re.compile(
    r"^(?:(?P<vllm>INFO|WARNING|DEBUG|ERROR|CRITICAL)\b"
    r"|(?P<py>INFO|WARNING|DEBUG|ERROR|CRITICAL):"
    r"|\[\d{4}-\d\d-\d\d [\d:,]+ (?P<glog>[IWDEF]) \d+"
    r"|\d{4}-\d\d-\d\d [\d:,]+\s+(?P<ts>INFO|WARNING|DEBUG|ERROR|CRITICAL)\b)"
)
_QUIET_LEVELS = {"INFO", "WARNING", "DEBUG", "I", "W", "D"}


def is_chatter(line: str) -> bool:
    """True for a console line a user cannot act on (see the module docstring)."""
    text = _ANSI.sub("", line).rstrip("\n")
    if _RAY_DEDUP.search(text) or _WARN_SOURCE.match(text):
        return True
    actor = _ACTOR_PREFIX.match(text)
    payload = text[actor.end() :] if actor else text
    if _WARNING_LINE.search(payload) and "Traceback" not in payload:
        return True
    level = _LOG_LEVEL.match(payload.lstrip())
    if level is None:
        return False
    if actor is None:  # the driver's own Ray log records: only its INFO/DEBUG chatter
        return level.group("ts") in ("INFO", "DEBUG")
    return next(g for g in level.groups() if g is not None) in _QUIET_LEVELS


class _FilteredStream:
    """A text stream that sends whole lines to the log and non-chatter lines on to `target`."""

    def __init__(self, target: IO[str], log: IO[str], lock: threading.Lock, counts: list[int]) -> None:
        self.target, self.log, self.lock, self.counts = target, log, lock, counts
        self.buffer_text = ""

    def write(self, text: str) -> int:
        with self.lock:
            self.buffer_text += text
            while "\n" in self.buffer_text:
                line, self.buffer_text = self.buffer_text.split("\n", 1)
                self._emit(line + "\n")
            if "\r" in self.buffer_text:  # a progress bar redrawing its line: show it now
                self._emit(self.buffer_text)
                self.buffer_text = ""
        return len(text)

    def _emit(self, text: str) -> None:
        self.log.write(text)
        if is_chatter(text):
            self.counts[0] += 1
        else:
            self.target.write(text)

    def flush(self) -> None:
        with self.lock:
            if self.buffer_text:
                self._emit(self.buffer_text)
                self.buffer_text = ""
            self.log.flush()
            self.target.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding... of the real stream
        return getattr(self.target, name)


@contextlib.contextmanager
def quiet_console(log_path: Path) -> Iterator[None]:
    """Filter the driver's stdout/stderr into `log_path` while the block runs; restores them after.

    On exit prints one line saying how many lines were kept off the console and where they are.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lock, counts = threading.Lock(), [0]
    original = sys.stdout, sys.stderr
    with log_path.open("a", encoding="utf-8", errors="replace") as log:
        out = _FilteredStream(sys.stdout, log, lock, counts)
        err = _FilteredStream(sys.stderr, log, lock, counts)
        sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
        try:
            yield
        finally:
            out.flush()
            err.flush()
            sys.stdout, sys.stderr = original
    if counts[0]:
        print(f"{counts[0]} lines of library warnings/info kept off the console: {log_path}", file=sys.stderr)
