"""Robustness at matched clean NLL: an attack's NLL increase on a target model against the unconstrained
reference curve (unconstrained models of different quality: checkpoints from along pretraining, the pretrained
model, the recovered baseline), at the target's own clean NLL on the attack examples. Numpy only.

The curve is piecewise linear in (mean clean NLL, mean increase) through its points sorted by clean NLL; the
matched difference is the target's mean increase less the curve's value at the target's mean clean NLL:
    D = m_T - (1 - w) m_A - w m_B,   w = (c_T - c_A) / (c_B - c_A)
between the bracketing points A and B (the two nearest at an end when the target lies outside the curve:
extrapolated, and said so). Its per-example linearisation (delta method, with the slope s of the segment)
    d_i = m_T,i - (1 - w) m_A,i - w m_B,i - s (c_T,i - (1 - w) c_A,i - w c_B,i)
averages exactly to D, and its variance includes the uncertainty of the matching point (the clean NLLs), so
the crossed estimate of d (pipeline/stats.py: documents x seeds) gives D's interval and tests. Points closer
than `min_gap` nats in mean clean NLL are pooled first (their per-example values averaged, labels joined by
"+"): a segment between two near-identical models has a slope dominated by noise, and the delta method
multiplies the clean NLLs' spread by it (a 0.001-nat segment gave +/-3 nats/token intervals)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CurvePoint:
    """One model on the attack examples: seeds x examples of clean NLL and of an attack's NLL increase."""
    label: str
    clean: np.ndarray
    increase: np.ndarray

    @property
    def clean_mean(self) -> float:
        return float(np.mean(self.clean))

    @property
    def increase_mean(self) -> float:
        return float(np.mean(self.increase))


@dataclass(frozen=True)
class Match:
    """Where the target meets the curve: the segment's end points, the weight w of the upper one and the
    segment's slope (nats of increase per nat of clean NLL)."""
    lower: str
    upper: str
    weight: float
    slope: float
    extrapolated: bool
    target_clean: float
    curve_increase: float       # the curve's mean increase at target_clean

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def pooled(curve: list[CurvePoint], min_gap: float) -> list[CurvePoint]:
    """The curve sorted by clean NLL, each run of points within `min_gap` of the run's first point averaged
    into one."""
    runs: list[list[CurvePoint]] = []
    for point in sorted(curve, key=lambda p: p.clean_mean):
        if runs and point.clean_mean - runs[-1][0].clean_mean < min_gap:
            runs[-1].append(point)
        else:
            runs.append([point])
    return [run[0] if len(run) == 1 else
            CurvePoint("+".join(p.label for p in run), np.mean([p.clean for p in run], axis=0),
                       np.mean([p.increase for p in run], axis=0)) for run in runs]


def segment(curve: list[CurvePoint], clean: float) -> tuple[CurvePoint, CurvePoint, bool]:
    """The adjacent pair of curve points (by clean NLL) around `clean`, or the end pair nearest it."""
    points = sorted(curve, key=lambda p: p.clean_mean)
    if len(points) < 2 or points[0].clean_mean == points[-1].clean_mean:
        raise ValueError(f"a reference curve needs >= 2 points of different clean NLL; got "
                         f"{[(p.label, p.clean_mean) for p in points]}")
    for a, b in zip(points, points[1:]):
        if a.clean_mean <= clean <= b.clean_mean and a.clean_mean < b.clean_mean:
            return a, b, False
    ends = (points[0], points[1]) if clean < points[0].clean_mean else (points[-2], points[-1])
    return ends[0], ends[1], True


def matched(target: CurvePoint, curve: list[CurvePoint], min_gap: float) -> tuple[np.ndarray, Match]:
    """Per-example (seeds x examples) linearised matched differences and where the target meets the curve
    (pooled at `min_gap` nats of clean NLL)."""
    a, b, extrapolated = segment(pooled(curve, min_gap), target.clean_mean)
    w = (target.clean_mean - a.clean_mean) / (b.clean_mean - a.clean_mean)
    slope = (b.increase_mean - a.increase_mean) / (b.clean_mean - a.clean_mean)
    d = (target.increase - (1 - w) * a.increase - w * b.increase
         - slope * (target.clean - (1 - w) * a.clean - w * b.clean))
    return d, Match(a.label, b.label, w, slope, extrapolated, target.clean_mean,
                    (1 - w) * a.increase_mean + w * b.increase_mean)
