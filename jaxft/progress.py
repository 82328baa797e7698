"""Progress of long work: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI).

Beside the reference's log lines, never instead of them: the bar goes to stderr, the plain
lines to the run's log every tenth of the work or every 30 seconds, whichever comes first.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

PLAIN_EVERY_S = 30.0


class Progress:
    """`update(n_seen, loss)` after each step of `total`; `close()` at the end.

    Reports steps/s, `unit`s/s (examples, tokens, prompts), the ETA and the last loss (when
    there is one).
    """

    def __init__(self, total: int, desc: str, unit: str, log: Callable[[str], None], enabled: bool = True,
                 terminal: bool | None = None) -> None:
        self.total, self.desc, self.unit, self.log, self.enabled = total, desc, unit, log, enabled and total > 0
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.done, self.seen, self.start = 0, 0, time.perf_counter()
        self.last_line, self.next_fraction = self.start, 0.1
        self.bar = None
        if self.enabled and self.terminal:
            from tqdm import tqdm  # here: a run without a terminal (and importing jaxft) never needs it

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)

    def _rates(self) -> tuple[float, float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps_s = self.done / elapsed
        eta = (self.total - self.done) / steps_s if steps_s > 0 else float("inf")
        return steps_s, self.seen / elapsed, eta

    def update(self, seen: int, loss: float | None = None) -> None:
        if not self.enabled:
            return
        self.done += 1
        self.seen += seen
        steps_s, seen_s, eta = self._rates()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{seen_s:,.0f} {self.unit}/s" + ("" if loss is None else f", loss {loss:.3f}"), refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if self.done == self.total or self.done >= self.next_fraction * self.total or now - self.last_line >= PLAIN_EVERY_S:
            while self.next_fraction * self.total <= self.done:
                self.next_fraction += 0.1
            self.last_line = now
            self.log(
                f"{self.desc}: step {self.done}/{self.total} ({100 * self.done / self.total:.0f}%), {steps_s:.2f} steps/s, "
                f"{seen_s:,.1f} {self.unit}/s, ETA {eta:.0f} s" + ("" if loss is None else f", loss {loss:.3f}")
            )

    def write(self, line: str) -> None:
        """Log `line` (the reference's lines) with the bar cleared first and redrawn after: on a
        terminal the bar (stderr) and the log (stdout) share the screen."""
        if self.bar is None:
            self.log(line)
            return
        with type(self.bar).external_write_mode():
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
