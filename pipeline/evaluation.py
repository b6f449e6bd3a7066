"""Held-out negative log-likelihood with a sliding window: every token of every document is scored
exactly once, with up to context_length - 1 tokens of left context; nothing is dropped by truncation.
Each document is scored as [EOS] + document + [EOS] (EOS marks the document start, and predicting the
closing EOS is part of the score)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .device import eval_autocast



def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [N, S] from logits [N, S, V]: rows of the vocabulary kept contiguous (2x faster on CPU than
    cross_entropy over a transposed [N, V, S] view)."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return flat.view(targets.shape)

def sliding_windows(length: int, context_length: int, stride: int):
    """(begin, end, first_scored) windows over a sequence of `length` tokens; position 0 is never a
    target. Targets first_scored..end-1 of each window are scored in it, and each target exactly once."""
    windows, prev_end, begin = [], 1, 0
    while prev_end < length:
        end = min(begin + context_length, length)
        windows.append((begin, end, prev_end))
        prev_end = end
        begin = min(begin + stride, end - 1)   # the next window's first target keeps one token of context
    return windows


@torch.no_grad()
def document_nll(model, documents: list[np.ndarray], eos_id: int, context_length: int, stride: int,
                 batch_size: int, desc: str = "nll", progress: bool = True,
                 precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) and scored-token count per document, computed where the model is (forward passes
    under eval_autocast(precision), the loss in fp32)."""
    device = next(model.parameters()).device
    jobs = []   # (doc index, tokens of the window, number of scored trailing targets)
    for d, doc in enumerate(documents):
        seq = np.concatenate([[eos_id], doc, [eos_id]]).astype(np.int64)
        for begin, end, first in sliding_windows(len(seq), context_length, stride):
            jobs.append((d, seq[begin:end], end - first))
    nll = np.zeros(len(documents), dtype=np.float64)
    count = np.zeros(len(documents), dtype=np.int64)
    model.eval()
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = jobs[start: start + batch_size]
        width = max(len(w) for _, w, _ in chunk)
        ids = torch.full((len(chunk), width), eos_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (_, w, _) in enumerate(chunk):
            ids[i, : len(w)] = torch.from_numpy(w)
            mask[i, : len(w)] = 1
        with eval_autocast(precision, device):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logits = logits.float()
        nll_per_token = token_nll(logits[:, :-1], ids[:, 1:].to(device))
        for i, (d, w, scored) in enumerate(chunk):
            nll[d] += nll_per_token[i, len(w) - 1 - scored: len(w) - 1].double().sum().item()
            count[d] += scored
    return nll, count


def perplexity(nll: np.ndarray, count: np.ndarray) -> float:
    return math.exp(float(nll.sum()) / float(count.sum()))


def unigram_perplexity(train_tokens: np.ndarray, documents: list[np.ndarray], eos_id: int, vocab_size: int) -> float:
    """Add-one smoothed unigram model fitted on train tokens, scored on the same targets as document_nll."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([np.concatenate([doc, [eos_id]]) for doc in documents]).astype(np.int64)
    return math.exp(-float(logp[targets].mean()))
