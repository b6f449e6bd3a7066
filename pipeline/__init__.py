"""Monotonic (non-negative feed-forward) language models: recovery training, perplexity and
adversarial robustness, as a reproducible DVC pipeline."""
