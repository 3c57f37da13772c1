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
    r"|\[(?P<c10>[IWEF])\d{4} [\d:.]+ "
    r"|\d{4}-\d\d-\d\d [\d:,]+\s+(?P<ts>INFO|WARNING|DEBUG|ERROR|CRITICAL)\b)"
)
_QUIET_LEVELS = {"INFO", "WARNING", "DEBUG", "I", "W", "D"}
_PROGRESS = re.compile(r"\d+%(?: Completed)? ?\|")  # tqdm bars of model/weight loading in the actors
# Messages libraries print without a level, seen on the demo's console: nothing for the user to do.
_KNOWN_NOISE = re.compile(
    r"^Triton is (?:installed, but doesn't include CPU backend|not installed)"
    r"|^Failed to load CPU gemm_4bit_forward from kernels-community"
)


def _split(line: str) -> tuple[str | None, str]:
    text = _ANSI.sub("", line).rstrip("\n")
    actor = _ACTOR_PREFIX.match(text)
    return (actor.group("who"), text[actor.end() :]) if actor else (None, text)


def is_chatter(line: str) -> bool:
    """True for a console line a user cannot act on (see the module docstring)."""
    who, payload = _split(line)
    bare = payload.replace("\r", "").strip()
    if _RAY_DEDUP.search(payload) or _WARN_SOURCE.match(payload) or _KNOWN_NOISE.match(bare):
        return True
    if _WARNING_LINE.search(payload) and "Traceback" not in payload:
        return True
    if who is not None and (not bare or _PROGRESS.search(bare)):
        return True
    level = _LOG_LEVEL.match(bare)
    if level is None:
        return False
    if who is None:  # the driver's own Ray log records: only its INFO/DEBUG chatter
        return level.group("ts") in ("INFO", "DEBUG")
    return next(g for g in level.groups() if g is not None) in _QUIET_LEVELS


class _FilteredStream:
    """A text stream that sends whole lines to the log and non-chatter lines on to `target`."""

    def __init__(self, target: IO[str], log: IO[str], lock: threading.Lock, counts: list[int]) -> None:
        self.target, self.log, self.lock, self.counts = target, log, lock, counts
        self.buffer_text = ""
        self.warned: set[str | None] = set()  # sources whose last line was a hidden warning
        self.partial_hidden = False  # the last \r-redrawn fragment was hidden (so is its newline)

    def write(self, text: str) -> int:
        with self.lock:
            self.buffer_text += text
            while "\n" in self.buffer_text:
                line, self.buffer_text = self.buffer_text.split("\n", 1)
                if not line and self.partial_hidden:  # the end of a hidden progress-bar line
                    self.log.write("\n")
                else:
                    self._emit(line + "\n")
                self.partial_hidden = False
            if "\r" in self.buffer_text:  # a progress bar redrawing its line: show it now
                self.partial_hidden = self._emit(self.buffer_text)
                self.buffer_text = ""
        return len(text)

    def _emit(self, text: str) -> bool:
        """Log `text`; show it unless it is chatter. Returns whether it was hidden."""
        self.log.write(text)
        who, payload = _split(text)
        # The source line Python prints under a warning ("  wrapper = lookup(...)") goes with it.
        continues = who in self.warned and payload[:1] in (" ", "\t") and payload.strip() != ""
        if continues or is_chatter(text):
            self.counts[0] += 1
            if _WARNING_LINE.search(payload):
                self.warned.add(who)
            elif not continues:
                self.warned.discard(who)
            return True
        self.warned.discard(who)
        self.target.write(text)
        return False

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
