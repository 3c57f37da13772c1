"""What a reward worker may use besides time: resident memory, and how much of its printing is kept.

Memory: the scorer polls each busy worker's resident set size (psutil) while it waits for replies, and
after each reply; a worker above ``rewards.max_worker_memory_mb`` is killed and replaced (the samples
it was scoring are masked with reason ``memory``). RSS polling rather than ``RLIMIT_AS``: an address
space limit also counts mapped-but-unused memory (thread stacks, sympy/numpy mappings), so it fails
allocations long before the process uses that much.

Output: a worker's stdout and stderr (Python's and native code's alike: file descriptors 1 and 2) go to
a private file opened with O_APPEND, never to the trainer's console. After each call the scorer moves
the last ``rewards.output_tail_kib`` KiB of it to the run's reward log and empties the file; while a
call runs, a file that grows past 64 MiB is emptied the same way, so a reward printing without end
costs bounded disk.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

_RUNAWAY_BYTES = 64 << 20  # a file this big during one call is emptied even while the worker writes


def resident_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB (0.0 if it is gone)."""
    import psutil

    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0.0


class RewardLog:
    """The run's reward log: tails of what reward functions printed, with a one-time console notice."""

    def __init__(self, path: Path | None, tail_bytes: int) -> None:
        if path is None:
            path = Path(tempfile.mkdtemp(prefix="grpo-ray-rewards-")) / "reward_output.log"
        self.path = path
        self.tail_bytes = tail_bytes
        self.printed_bytes = 0
        """Bytes printed by reward functions so far (what the log keeps is at most one tail per call)."""
        self._lock = threading.Lock()
        self._announced = False

    def append(self, label: str, printed: int, tail: bytes) -> None:
        with self._lock:
            self.printed_bytes += printed
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as log:
                shown = f"last {len(tail)} bytes" if len(tail) < printed else "all of it"
                log.write(
                    f"--- {time.strftime('%H:%M:%S')} {label}: printed {printed} bytes ({shown})\n".encode()
                )
                log.write(tail if tail.endswith(b"\n") else tail + b"\n")
            if not self._announced:
                self._announced = True
                print(
                    f"reward functions print output; it is kept out of the console, the last "
                    f"{self.tail_bytes // 1024} KiB of each call go to {self.path}",
                    file=sys.stderr,
                )


class WorkerOutput:
    """One worker's stdout/stderr file: counted, its tail kept, emptied after each call."""

    def __init__(self, log: RewardLog) -> None:
        self.log = log
        fd, name = tempfile.mkstemp(prefix="grpo-ray-reward-worker-", suffix=".out")
        os.close(fd)
        self.file: IO[bytes] = open(name, "ab+")  # noqa: SIM115 (lives as long as the worker)
        os.unlink(name)  # only the open descriptors keep it
        self._printed = 0
        self._offset = 0  # bytes of the file already counted
        self._tail = b""

    def fileno(self) -> int:
        return self.file.fileno()

    def _absorb(self, truncate: bool) -> None:
        size = os.fstat(self.file.fileno()).st_size
        keep = self.log.tail_bytes
        if size > self._offset:
            self.file.seek(max(self._offset, size - keep))
            self._tail = (self._tail + self.file.read(size - max(self._offset, size - keep)))[-keep:]
            self._printed += size - self._offset
            self._offset = size
        if truncate and size:
            # The worker appends (O_APPEND), so its next write starts at 0. Safe between calls; during a
            # call (only for a runaway printer) bytes written between fstat and here go uncounted.
            os.ftruncate(self.file.fileno(), 0)
            self._offset = 0

    def poll(self) -> None:
        """During a call: keep a reward that prints without end from filling the disk."""
        if os.fstat(self.file.fileno()).st_size > _RUNAWAY_BYTES:
            self._absorb(truncate=True)

    def flush(self, label: str) -> bytes:
        """After a call (or a kill): move what was printed to the run's log; returns the tail."""
        self._absorb(truncate=True)
        tail, printed = self._tail, self._printed
        self._tail, self._printed = b"", 0
        if printed:
            self.log.append(label, printed, tail)
        return tail

    def close(self) -> None:
        self.file.close()
