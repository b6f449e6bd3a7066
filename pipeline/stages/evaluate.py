"""Stage `evaluate`: held-out test perplexity of one arm (sliding window, nothing truncated) and the
per-document NLL that paired statistics across arms use (pipeline/assessment.py: evaluate)."""
from __future__ import annotations

from ..assessment import evaluate
from ..loading import load_arm_model


def run(params, args) -> int:
    evaluate(params, args.arm, args.seed, *load_arm_model(params, args.arm, args.seed, scoring=True))
    return 0
