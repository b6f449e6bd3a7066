"""Training loop pieces (placeholder for the recovery trainer of the training issue): the schedule,
seeding and a plain AdamW loop used to pretrain the embedded model."""
from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
from tqdm import tqdm


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Linear warmup, then cosine decay to peak * min_lr_ratio at the last step."""
    warmup = int(total * warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a [B, T+1] packed batch."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def pretrain_loop(model, packed, steps: int, batch_size: int, lr: float, warmup_ratio: float,
                  weight_decay: float, seed: int) -> list[dict]:
    seed_everything(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    log, t0 = [], time.time()
    model.train()
    bar = tqdm(range(steps), desc="pretrain")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup_ratio, 0.1)
        batch = torch.from_numpy(packed.batch(packed.sequence_ids(seed, step * batch_size, batch_size)))
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                    "elapsed_s": round(time.time() - t0, 3)})
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return log
