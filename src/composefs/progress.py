"""Progress display for long operations: on a terminal only, quiet in pipes and files."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """One status line, redrawn at most ``rate`` times a second; cleared by :meth:`done`.

    Shown only when ``stream`` is a terminal and only after ``delay`` seconds, so quick
    runs and scripts see nothing.
    """

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        *,
        delay: float = 0.5,
        rate: float = 10,
        unit: str = "files",
    ) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.start = time.monotonic()
        self.delay = delay
        self.interval = 1 / rate
        self._last = 0.0
        self._shown = False

    def update(self, done: int, total: int, done_bytes: int, total_bytes: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self.delay or now - self._last < self.interval:
            return
        self._last = now
        rate = done_bytes / max(now - self.start, 1e-9)
        line = f"{self.label}: {done}/{total} {self.unit}"
        if total_bytes:
            line += f", {human_size(done_bytes)}/{human_size(total_bytes)}"
            line += f" ({human_size(rate)}/s)"
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
