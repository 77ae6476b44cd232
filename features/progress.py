"""Progress for long loops: a tqdm bar on a terminal; in a log file or a pipe, where a bar's
carriage returns would pile up, a plain line every ``TAPS_PROGRESS_EVERY`` seconds (default 10)."""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm


class Progress:
    """``update(n)`` as images are done; ``close()`` at the end. ``enabled=False``: silent."""

    def __init__(self, total: int | None, desc: str, *, initial: int = 0, enabled: bool = True, unit: str = "img"):
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, file=sys.stderr, desc=desc,
                        disable=not terminal)
        self.plain = enabled and not terminal
        self.every = float(os.environ.get("TAPS_PROGRESS_EVERY", "10"))
        self.start = self.last = time.perf_counter()
        self.first = initial

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        now = time.perf_counter()
        if self.plain and now - self.last >= self.every:
            self.last = now
            rate = (self.done - self.first) / max(now - self.start, 1e-9)
            of = f"/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else ""
            print(f"{self.desc}: {self.done}{of} {self.unit}, {rate:.1f} {self.unit}/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
