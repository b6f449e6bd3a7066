"""Stage `select_lr`: every trained arm's learning rate, chosen with equal tuning effort (pipeline/lr_select.py).
Each arm trains from its own start once per grid point, lr_select.steps steps on lr_select.seed's data order,
and keeps the value with the lowest validation loss (the same validation windows as its full run). Writes
paths.LR_SELECTION: per arm the knob, the grid, each trial's validation loss, the selection; `train` reads it."""
from __future__ import annotations

import math

from .. import arms
from .. import data
from .. import lr_select
from ..io import write_json
from ..loading import load_start_model
from ..paths import DATA_DIR, LR_SELECTION
from ..provenance import provenance, record_run
from ..training import seed_everything, train


def trials(params, arm: arms.Arm, train_data, val_data) -> tuple[dict, object]:
    """One arm's grid, each multiplier trained from the arm's start; the selection among them, and the last
    trial's model (for the run record's device)."""
    multipliers, losses, lrs = lr_select.grid(params, arm), [], []
    for m in multipliers:
        tp = lr_select.trial(params, arm, m)
        seed_everything(params.lr_select.seed)
        model, constrained, _ = load_start_model(params, arm, params.lr_select.seed)
        result = train(model, tp, train_data, val_data, seed=params.lr_select.seed, constrained=constrained,
                       desc=f"select_lr {arm.name} {lr_select.knob(arm)} x{m:g}")
        losses.append(result.state.val_log[-1]["val_loss"])
        lrs.append(tp.lr * (tp.constrained_lr_multiplier if arm.constrained else 1.0))
    best = lr_select.select(losses)
    return {"knob": lr_select.knob(arm), "multipliers": multipliers, "lr": lrs, "validation_loss": losses,
            "selected": multipliers[best], "selected_lr": lrs[best], "steps": params.lr_select.steps}, result.model


def run(params, args) -> int:
    seq_len = params.data.seq_len
    train_data = data.PackedSequences(DATA_DIR, "train", seq_len)
    val_data = data.PackedSequences(DATA_DIR, "validation", seq_len)
    prov = provenance(params, "select_lr", seed=params.lr_select.seed)
    chosen = {}
    for name in arms.TRAINED_ARMS:
        arm = arms.get(name)
        chosen[name], model = trials(params, arm, train_data, val_data)
        c = chosen[name]
        tried = ", ".join(f"x{m:g}: {math.exp(loss):.2f}" for m, loss in zip(c["multipliers"], c["validation_loss"]))
        print(f"select_lr {name}: {c['knob']} x{c['selected']:g}, lr {c['selected_lr']:.3g} (validation perplexity "
              f"after {params.lr_select.steps} steps: {tried})", flush=True)
    write_json(LR_SELECTION, {"arms": chosen, "provenance": prov})
    record_run("select_lr", prov, model)
    return 0
