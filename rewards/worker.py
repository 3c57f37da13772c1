"""The reward worker process: resolves the reward functions, then runs one call at a time in its main thread.

Started by :class:`rewards.scorer.RewardScorer` as ``python -c BOOTSTRAP <fd>`` (a fresh interpreter:
no fork of the trainer, and unlike multiprocessing's ``spawn`` the trainer's ``__main__`` is not
re-imported). ``<fd>`` is the worker's end of a socket pair, wrapped in a multiprocessing Connection.

Protocol (pickled messages):

* scorer -> worker, first: ``(functions: list[str], parent_pid: int)``
* worker -> scorer: ``("ready", errors: dict[function, message])`` — empty when every function resolved
* scorer -> worker: ``(function, kwargs, completions, rows)``; worker -> scorer: a :data:`Reply`
* scorer -> worker: ``None`` — exit
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

# Run by the child interpreter. The trainer's sys.path arrives in an environment variable (and is removed
# from the environment, so processes the reward function starts do not inherit it).
PATH_ENV = "GRPO_RAY_REWARD_WORKER_SYS_PATH"
BOOTSTRAP = (
    "import json, os, sys; "
    f"sys.path[:] = json.loads(os.environ.pop({PATH_ENV!r})); "
    "from rewards.worker import main; main(int(sys.argv[1]))"
)

_TRACEBACK_CHARS = 4000

# A worker's reply to one call:
#   ("ok", values, reasons, notes)   one entry per sample; reason and note are None when the value is usable
#   ("exception", text)              the function raised; text is the formatted traceback
#   ("bad_return", description)      not a list/tuple, or the wrong length
#   ("signature", text)              the function cannot take (completions, rows, **kwargs)
Reply = tuple[Any, ...]


def short_repr(obj: Any, limit: int = 120) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__} with a failing repr>"
    return text if len(text) <= limit else text[:limit] + "..."


def classify(value: Any) -> tuple[float | None, str | None, str | None]:
    """(value, mask reason, note) for one returned entry; reason is None when the value is usable."""
    if value is None:
        return None, "none", "returned None"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        return None, "non_numeric", f"returned {type(value).__name__} {short_repr(value)}, not a number"
    try:
        number = float(value)  # bool, int, float, numpy scalars, one-element arrays/tensors
    except Exception:
        return None, "non_numeric", f"returned {type(value).__name__} {short_repr(value)}, not a number"
    if math.isnan(number):
        return None, "nan", "returned nan"
    if math.isinf(number):
        return None, "inf", f"returned {number}"
    return number, None, None


def _format_exception(e: BaseException) -> str:
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # drop call()'s own frame
    try:
        text = "".join(traceback.format_exception(type(e), e, tb))
    except Exception:
        text = f"{type(e).__name__} (its message could not be formatted)\n"
    return text if len(text) <= _TRACEBACK_CHARS else "...\n" + text[-_TRACEBACK_CHARS:]


def call(fn: Any, completions: list[str], rows: list[dict[str, Any]], kwargs: dict[str, Any]) -> Reply:
    """Run one reward call and describe the outcome as a picklable :data:`Reply`."""
    try:
        inspect.signature(fn).bind(completions, rows, **kwargs)
    except TypeError as e:
        return ("signature", str(e))
    except ValueError:  # no introspectable signature (some C callables): the call itself will tell
        pass
    try:
        out = fn(completions, rows, **kwargs)
    except BaseException as e:  # SystemExit too; SIGINT is ignored in workers
        if isinstance(e, TypeError) and e.__traceback__ is not None and e.__traceback__.tb_next is None:
            return ("signature", f"{type(e).__name__}: {e}")  # raised by the call itself, not inside fn
        return ("exception", _format_exception(e))
    if not isinstance(out, (list, tuple)):
        return ("bad_return", f"a {type(out).__name__} ({short_repr(out)})")
    if len(out) != len(completions):
        return (
            "bad_return",
            f"a {type(out).__name__} of length {len(out)} for {len(completions)} completions ({short_repr(out)})",
        )
    classified = [classify(v) for v in out]
    return ("ok", [c[0] for c in classified], [c[1] for c in classified], [c[2] for c in classified])


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:  # the trainer died (even by SIGKILL): do not linger
            os._exit(1)


def _resolve_all(functions: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    from rewards.base import RewardConfigError
    from rewards.builtin import resolve

    resolved: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for function in functions:
        try:
            fn = resolve(function)
            setup = getattr(fn, "setup", None)
            if callable(setup):
                setup()  # slow imports happen here, outside any time limit
            resolved[function] = fn
        except RewardConfigError as e:
            errors[function] = str(e)
        except Exception:
            errors[function] = f"reward {function!r}: its setup() failed:\n{traceback.format_exc()}"
    return resolved, errors


def main(fd: int) -> None:
    """Serve reward calls over the connection on file descriptor ``fd`` until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the trainer, which closes us
    conn = Connection(fd)
    try:
        functions, parent_pid = conn.recv()
    except (EOFError, OSError):
        return
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    resolved, errors = _resolve_all(functions)
    conn.send(("ready", errors))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        function, kwargs, completions, rows = message
        reply = call(resolved[function], completions, rows, kwargs)
        for stream in (sys.stdout, sys.stderr):  # what it printed reaches the scorer's log file now
            with contextlib.suppress(Exception):
                stream.flush()
        try:
            conn.send(reply)
        except (OSError, EOFError):
            return
