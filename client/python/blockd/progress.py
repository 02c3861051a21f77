"""A one-line progress bar for terminals (stderr); silent when stderr is not a terminal.

    bar = Progress(total_bytes, "import", unit="B")
    bar.update(n); bar.set_postfix("layer 3"); bar.write("a line above the bar"); bar.close()
"""
import sys
import time


def _rounded(x):
    """A rate with as many digits as it is worth: 1234 -> "1234", 12.34 -> "12.3", 0.1234 -> "0.12"
    (format `g` wrote 12.3457 and 1.23457e+06)."""
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _human(n, unit):
    if unit != "B":
        return str(int(n)) if float(n).is_integer() else _rounded(n)
    for u in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or u == "GiB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= 1024.0


def _rate(n, unit):
    """"12.3 it/s" (rounded sensibly), or bytes per second in binary units ("1.5 MiB/s")."""
    return f"{_human(n, unit)}/s" if unit == "B" else f"{_rounded(n)} {unit}/s"


class Progress:
    def __init__(self, total, desc="", unit="it", stream=None, enabled=None, width=30):
        self.total = max(total, 0)
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.width = width
        self.done = 0
        self.postfix = ""
        self.start = time.monotonic()
        self._last = 0.0
        self._render(force=True)

    def update(self, n=1):
        self.done += n
        self._render()

    def write(self, message):
        """Prints a line above the bar (or just the line when the bar is off)."""
        if self.enabled:
            self.stream.write("\r\x1b[K" + message + "\n")
            self._render(force=True)
        else:
            print(message, flush=True)

    def set_postfix(self, text):
        self.postfix = text
        self._render()

    def _render(self, force=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        line = (f"\r{self.desc} |{'#' * fill}{'.' * (self.width - fill)}| {100 * frac:3.0f}% "
                f"{_human(self.done, self.unit)}/{_human(self.total, self.unit)} "
                f"[{elapsed:.0f}s, {_rate(rate, self.unit)}] {self.postfix}")
        self.stream.write(line + "\x1b[K")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self._render(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False
