"""Progress display for ``migsec migrate --verbose``: a bar on a terminal, plain lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """Renders (phase, done, total) updates with bytes, rate and ETA."""

    def __init__(self, stream: TextIO | None = None, *, clock=time.monotonic, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.clock = clock
        self.width = width
        self.start = clock()
        self._last_line = 0.0
        self._last_pct = -1
        self._phase = ""

    def update(self, phase: str, done: int, total: int) -> None:
        """``total`` 0 (or below ``done``): not known yet (an image still being written), so
        bytes and rate are shown without a percentage, bar or ETA."""
        now = self.clock()
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        known = total > 0 and total >= done
        eta = (total - done) / rate if known and rate > 0 and total > done else 0.0
        pct = int(100 * done / total) if known else -1
        amount = f"{human_bytes(done)}/{human_bytes(total)}" if known else human_bytes(done)
        tail = f"{amount} {human_bytes(rate)}/s" + (f" ETA {human_seconds(eta)}" if known else "")
        if self.tty:
            if self._phase and phase != self._phase:
                self.stream.write("\n")  # keep the finished phase's bar on screen
            if known:
                filled = int(self.width * pct / 100)
                bar = "[" + "#" * filled + "-" * (self.width - filled) + f"] {pct:3d}% "
            else:
                bar = ""
            self.stream.write(f"\r{phase:<10} {bar}{tail}\x1b[K")
            self.stream.flush()
        else:
            # plain lines for logs: on phase change, every 10 %, or at most every 5 s
            if (phase != self._phase or (known and pct // 10 != self._last_pct // 10)
                    or now - self._last_line >= 5 or (known and done == total)):
                self.stream.write(f"{phase}: {f'{pct}% ' if known else ''}{tail}\n")
                self.stream.flush()
                self._last_line = now
        self._phase = phase
        self._last_pct = pct

    def message(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
