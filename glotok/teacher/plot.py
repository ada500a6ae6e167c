"""A PNG bar plot of a teacher histogram, and of a student's beside it, drawn with PIL alone
(matplotlib is not a dependency).

Bars at the bin centres on [-1, 1] (cosine similarity of code pairs), heights in probability
mass; with a student, the two bars of a bin stand side by side and the title gives
``KL(teacher || student)``, the histogram loss before its weight.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

TEACHER_COLOUR = (31, 119, 180)
STUDENT_COLOUR = (255, 127, 14)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes: the bitmap font
        return ImageFont.load_default()


def kl_divergence(p: Sequence[float], q: Sequence[float], eps: float = 1e-12) -> float:
    """KL(p || q) in nats, as the loss computes it (``q + eps`` inside the log)."""
    return float(sum(a * (math.log(a) - math.log(b + eps)) for a, b in zip(p, q) if a > 0))


def _nice_step(top: float) -> float:
    raw = top / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def plot_histograms(path: str | Path, teacher: Sequence[float], *, title: str,
                    student: Optional[Sequence[float]] = None, teacher_label: str = "teacher",
                    student_label: str = "student", size: tuple[int, int] = (960, 540)) -> Path:
    """Draw ``teacher`` (and ``student``) histograms over [-1, 1] into the PNG ``path``."""
    bins = len(teacher)
    if student is not None and len(student) != bins:
        raise ValueError(f"student has {len(student)} bins, the teacher {bins}")
    w, h = size
    left, right, top, bottom = 80, 30, 60, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    ymax = max([*teacher, *(student or [])]) * 1.08 or 1.0
    step = _nice_step(ymax)
    px = lambda x: left + (x + 1) / 2 * (w - left - right)  # noqa: E731 - cosine -> pixel
    py = lambda y: h - bottom - y / ymax * (h - top - bottom)  # noqa: E731 - mass -> pixel

    for i in range(int(ymax / step) + 1):  # y grid and labels
        y = i * step
        d.line([(left, py(y)), (w - right, py(y))], fill=(225, 225, 225))
        d.text((left - 8, py(y)), f"{y:.3g}", fill="black", font=small, anchor="rm")
    for x in (-1, -0.5, 0, 0.5, 1):
        d.line([(px(x), h - bottom), (px(x), h - bottom + 5)], fill="black")
        d.text((px(x), h - bottom + 8), f"{x:g}", fill="black", font=small, anchor="ma")
    d.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")

    width = (px(1) - px(-1)) / (bins - 1) * 0.8
    series = [(teacher, TEACHER_COLOUR)] + ([(student, STUDENT_COLOUR)] if student else [])
    bar = width / len(series)
    for s, (values, colour) in enumerate(series):
        for k, v in enumerate(values):
            x0 = px(-1 + 2 * k / (bins - 1)) - width / 2 + s * bar
            d.rectangle([x0, py(v), x0 + bar - 1, h - bottom], fill=colour)

    d.text((w / 2, 20), title, fill="black", font=font, anchor="ma")
    d.text((w / 2, h - 22), "cosine similarity of code pairs", fill="black", font=small,
           anchor="ma")
    labels = [(teacher_label, TEACHER_COLOUR)] + (
        [(student_label, STUDENT_COLOUR)] if student else [])
    for i, (label, colour) in enumerate(labels):  # legend, top left inside the axes
        y = top + 8 + 22 * i
        d.rectangle([left + 12, y, left + 26, y + 14], fill=colour)
        d.text((left + 34, y + 7), label, fill="black", font=small, anchor="lm")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path
