"""A dependency-free PNG line plot (zlib + a 5x7 bitmap font), for the examples' loss curves.

    save_line_plot("loss.png", {"train loss": losses, "smoothed": ema}, title="tiny LM",
                   xlabel="step", ylabel="loss")
"""
import math
import struct
import zlib

_FONT = {  # 5x7 glyphs, one 5-bit row per entry, top to bottom
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), "A": (14, 17, 17, 17, 31, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16), "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17),
    "L": (16, 16, 16, 16, 16, 16, 31), "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13),
    "R": (30, 17, 17, 30, 20, 18, 17), "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10),
    "X": (17, 17, 10, 4, 10, 17, 17), "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    ".": (0, 0, 0, 0, 0, 12, 12), "-": (0, 0, 0, 31, 0, 0, 0), ":": (0, 12, 12, 0, 12, 12, 0),
    "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8), "/": (0, 1, 2, 4, 8, 16, 0),
    ",": (0, 0, 0, 0, 12, 4, 8), "=": (0, 0, 31, 0, 31, 0, 0), "%": (24, 25, 2, 4, 8, 19, 3),
    "_": (0, 0, 0, 0, 0, 0, 31), "+": (0, 4, 4, 31, 4, 4, 0), " ": (0,) * 7,
}
_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


class Canvas:
    def __init__(self, width, height, background=(255, 255, 255)):
        self.w, self.h = width, height
        self.px = bytearray(bytes(background) * (width * height))

    def blend(self, x, y, color, alpha=1.0):
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            for c in range(3):
                self.px[i + c] = int(round(self.px[i + c] * (1 - alpha) + color[c] * alpha))

    def rect(self, x0, y0, x1, y1, color):
        for y in range(max(y0, 0), min(y1, self.h)):
            for x in range(max(x0, 0), min(x1, self.w)):
                self.blend(x, y, color)

    def line(self, x0, y0, x1, y1, color, width=1, alpha=1.0):
        """A straight line, sampled densely and stamped `width` pixels wide."""
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        seen = set()
        for i in range(n + 1):
            t = i / n
            cx, cy = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
            for dx in range(width):
                for dy in range(width):
                    p = (int(round(cx)) + dx - width // 2, int(round(cy)) + dy - width // 2)
                    if p not in seen:
                        seen.add(p)
                        self.blend(p[0], p[1], color, alpha)

    def text(self, x, y, s, color=(0, 0, 0), scale=2, anchor="left"):
        s = s.upper()
        width = len(s) * 6 * scale
        if anchor == "center":
            x -= width // 2
        elif anchor == "right":
            x -= width
        for ch in s:
            rows = _FONT.get(ch, _FONT[" "])
            for r, bits in enumerate(rows):
                for c in range(5):
                    if bits & (16 >> c):
                        self.rect(x + c * scale, y + r * scale, x + (c + 1) * scale, y + (r + 1) * scale, color)
            x += 6 * scale

    def text_vertical(self, x, y, s, color=(0, 0, 0), scale=2):
        """Text rotated 90 degrees counter-clockwise, centred on (x, y)."""
        s = s.upper()
        y += len(s) * 6 * scale // 2
        for ch in s:
            rows = _FONT.get(ch, _FONT[" "])
            for r, bits in enumerate(rows):
                for c in range(5):
                    if bits & (16 >> c):
                        self.rect(x + r * scale, y - (c + 1) * scale, x + (r + 1) * scale, y - c * scale, color)
            y -= 6 * scale

    def png(self):
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w:3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def nice_ticks(lo, hi, count=5):
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 10))
    return ticks, step


def _label(v, step):
    digits = max(0, -int(math.floor(math.log10(step)))) if step < 1 else 0
    return f"{v:.{digits}f}"


def save_line_plot(path, series, title="", xlabel="", ylabel="", width=800, height=480, xs=None):
    """series: {name: [y values]} (or one list); xs: the shared x values (default 1..n)."""
    if not isinstance(series, dict):
        series = {"": list(series)}
    n = max(len(v) for v in series.values())
    xs = list(xs) if xs is not None else list(range(1, n + 1))
    ys = [y for v in series.values() for y in v if y is not None and math.isfinite(y)]
    xt, xstep = nice_ticks(min(xs), max(xs))
    yt, ystep = nice_ticks(min(ys), max(ys))
    left, right, top, bottom = 90, 20, 50, 60
    cv = Canvas(width, height)
    pw, ph = width - left - right, height - top - bottom

    def px(x):
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * pw

    def py(y):
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    for t in yt:
        cv.line(left, py(t), left + pw, py(t), (225, 225, 225))
        cv.text(left - 8, int(py(t)) - 7, _label(t, ystep), anchor="right")
    for t in xt:
        cv.line(px(t), top, px(t), top + ph, (225, 225, 225))
        cv.text(int(px(t)), top + ph + 8, _label(t, xstep), anchor="center")
    for x0, y0, x1, y1 in ((left, top, left + pw, top), (left, top + ph, left + pw, top + ph),
                           (left, top, left, top + ph), (left + pw, top, left + pw, top + ph)):
        cv.line(x0, y0, x1, y1, (0, 0, 0))
    for k, (name, values) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        pts = [(px(x), py(y)) for x, y in zip(xs, values) if y is not None and math.isfinite(y)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            cv.line(x0, y0, x1, y1, color, width=2 if k else 1, alpha=1.0 if k else 0.5)
        if name:
            ly = top + 10 + 20 * k
            cv.line(left + pw - 190, ly + 7, left + pw - 160, ly + 7, color, width=2)
            cv.text(left + pw - 150, ly, name)
    cv.text(width // 2, 15, title, anchor="center")
    cv.text(left + pw // 2, height - 24, xlabel, anchor="center")
    cv.text_vertical(12, top + ph // 2, ylabel)
    with open(path, "wb") as f:
        f.write(cv.png())
