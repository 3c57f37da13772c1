"""Where a run's time goes from the command to the first training step, and on to the end.

The driver times its own phases (`StartupClock.span`); every actor records its own (grpo_ray.spans:
process start, imports, model load / 4-bit quantization, engine build with vLLM's model load and KV
cache phases) and the driver adds them (`add_actor`). All times are epoch seconds, shown relative to
the driver process's start, so overlapping phases (the engines build while the learner loads) show as
overlapping. `line()` is printed once, just before the first step; RUN_DIR/startup.json keeps every
phase, and is rewritten at the end with the first step, the last phases and the total.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from grpo_ray.spans import Span, process_start_time

DRIVER = "driver"


@dataclass
class Phase:
    where: str  # "driver", "learner", "engine-0", ...
    name: str
    begin: float  # epoch seconds
    end: float
    cpu: float = float("nan")  # CPU seconds its process used meanwhile (NaN: not measured)

    @property
    def seconds(self) -> float:
        return self.end - self.begin


@dataclass
class StartupClock:
    """Phases of one run, driver and actors, on one wall-clock axis starting at `origin`."""

    origin: float = field(default_factory=process_start_time)
    phases: list[Phase] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # instants: "first step", "end"

    @contextmanager
    def span(self, name: str, where: str = DRIVER) -> Iterator[None]:
        begin, cpu = time.time(), time.process_time()
        try:
            yield
        finally:
            self.phases.append(Phase(where, name, begin, time.time(), time.process_time() - cpu))

    def add(
        self, name: str, begin: float, end: float, where: str = DRIVER, cpu: float = float("nan")
    ) -> None:
        self.phases.append(Phase(where, name, begin, end, cpu))

    def add_actor(self, where: str, spans: list[Span]) -> None:
        """An actor's own spans (`startup_spans()`), named `where` in the breakdown; an actor that
        was ready before this run began (a warm pool's spare) is named `where (warm pool)`."""
        if spans and max(end for _, _, end, _ in spans) < self.origin:
            where += " (warm pool)"
        for name, begin, end, cpu in spans:
            self.phases.append(Phase(where, name, begin, end, cpu))

    def cpu_seconds(self, where: str | None = None) -> float:
        """CPU seconds of the top-level phases measured (of one process, or of all)."""
        return sum(
            p.cpu
            for p in self.phases
            if "/" not in p.name and p.cpu == p.cpu and (where is None or p.where == where)
        )

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks[name] = time.time() if at is None else at

    def since_origin(self, t: float) -> float:
        return t - self.origin

    def line(self) -> str:
        """One line: the time to the first step, then each process's phases in the order they began.

        Sub-phases (`build engine/load weights`) are shown in brackets after their phase; actor lines
        say when the actor was ready (its last phase's end) since the driver's start.
        """
        first = self.marks.get("first step")
        head = f"start-up {self.since_origin(first):.1f} s to the first step" if first else "start-up"
        head += " (wall s; actors' CPU s in parentheses)"
        parts = [head]
        for where in self._places():
            phases = [p for p in self.phases if p.where == where]
            ready = max(p.end for p in phases)
            items = _render(phases)
            parts.append(
                f"{where}: {items}"
                if where == DRIVER
                else f"{where} ready at {self.since_origin(ready):.1f} s ({items})"
            )
        return " | ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "origin_epoch_s": self.origin,
            "marks_s": {name: round(self.since_origin(t), 3) for name, t in self.marks.items()},
            "phases": [
                {
                    "where": p.where,
                    "phase": p.name,
                    "start_s": round(self.since_origin(p.begin), 3),
                    "end_s": round(self.since_origin(p.end), 3),
                    "seconds": round(p.seconds, 3),
                    "cpu_s": None if p.cpu != p.cpu else round(p.cpu, 3),
                }
                for p in sorted(self.phases, key=lambda p: p.begin)
            ],
        }

    def write(self, run_dir: Path) -> Path:
        path = run_dir / "startup.json"
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    def _places(self) -> list[str]:
        first_begin: dict[str, float] = {}
        for p in self.phases:
            first_begin[p.where] = min(first_begin.get(p.where, p.begin), p.begin)
        return sorted(first_begin, key=lambda w: (w != DRIVER, first_begin[w]))


def _render(phases: list[Phase]) -> str:
    """'a 1.0, b 2.0 [b/x 0.5]': top-level phases in order, each with its sub-phases."""
    top = sorted((p for p in phases if "/" not in p.name), key=lambda p: p.begin)
    out = []
    for p in top:
        subs = [s for s in phases if s.name.startswith(p.name + "/")]
        text = f"{p.name} {p.seconds:.1f}" + (
            f" ({p.cpu:.1f})" if p.where != DRIVER and p.cpu == p.cpu else ""
        )
        if subs:
            text += " [" + ", ".join(f"{s.name.split('/', 1)[1]} {s.seconds:.2f}" for s in subs) + "]"
        out.append(text)
    return ", ".join(out)
