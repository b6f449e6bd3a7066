"""Stage `pretrain`: the `pretrained` arm. Embedded: a tiny GPT-NeoX trained from scratch on the train
split (standing in for Pythia's pretraining). Cluster: the pinned checkpoint, loaded offline (model.hf_local_path,
or the pinned commit's snapshot in the HF hub cache, verified before anything runs).

Also the unconstrained checkpoints of the matched-NLL frontier (frontier.steps), under
outputs/models/pretrain_steps/step<N>: saved as pretraining passes step N (scratch), or the hub branches step<N>
at the commits refs.lock.yaml records (hf; Pythia's intermediate checkpoints)."""
from __future__ import annotations

import dataclasses
import time

from .. import data
from .. import hub, refs
from ..evaluation import document_nll, perplexity, unigram_perplexity
from ..io import staged_dir, write_csv, write_json
from ..models import count_parameters, load_causal_lm, save_causal_lm, tiny_gpt_neox
from ..arms import at_step
from .. import device
from ..paths import DATA_DIR, METRICS_DIR, PRETRAIN_STEPS_DIR, model_dir
from ..params import TrainParams
from ..provenance import provenance, record_run
from ..training import seed_everything, split_log, train

def pretrain_overrides(params) -> dict:
    """What pretraining sets itself; every other train.* key (the optimizer's betas, clipping, schedule floor,
    precision, logging) it inherits from params.train, and dvc.yaml declares those as pretrain's params."""
    p = params.pretrain
    return dict(max_steps=p.steps, batch_size=p.batch_size, grad_accum=1, lr=p.lr, warmup_ratio=p.warmup_ratio,
                weight_decay=p.weight_decay, constrained_lr_multiplier=1.0, constrained_weight_decay=0.0,
                gradient_checkpointing=False, eval_interval=p.steps, eval_batches=1, checkpoint_interval=p.steps,
                keep_checkpoints=1, max_steps_per_run=0, wall_clock_limit_s=0, beyond_one_epoch="warn",
                arm_overrides={})


def pretrain_params(params) -> TrainParams:
    """The pretraining run in the trainer's terms: evaluated once at the end, no checkpoints or early stops
    (embedded scale, minutes)."""
    return dataclasses.replace(params.train, **pretrain_overrides(params))


def step_saver(steps, tokenizer, out_dir, origin: dict, prov: dict):
    """after_step for the trainer: the model as it is after each of `steps`, saved under out_dir/step<N>."""
    def save(step: int, model, _root) -> None:
        if step in steps:
            save_causal_lm(model, tokenizer, out_dir / f"step{step}",
                           {"arm": at_step("pretrained", step).name, "variant": None, **origin, "steps": step,
                            "provenance": prov})
    return save


def hub_steps(params, tokenizer, out_dir, prov: dict, entries: dict) -> None:
    """The hub checkpoints of frontier.steps at refs.lock.yaml's commits, verified and saved like every arm's model."""
    m = dataclasses.replace(params.model, hf_local_path=None)
    for step, entry in entries.items():
        save_causal_lm(load_causal_lm(hub.model_dir(m, entry["commit"])), tokenizer, out_dir / f"step{step}",
                       {"arm": at_step("pretrained", step).name, "variant": None, "source": "hf", "name": m.hf_name,
                        "ref": entry["ref"], "revision": entry["commit"], "steps": step, "provenance": prov})


def run(params, args) -> int:
    t0 = time.time()
    lock, hf = refs.read(), params.model.source == "hf"      # every commit looked up before anything loads
    model_entry = refs.find(params, "model", lock=lock) if hf else None
    step_entries = {s: refs.find(params, "frontier", refs.frontier_ref(s), lock) for s in params.frontier.steps} if hf else {}
    checkpoint = hub.model_dir(params.model, model_entry["commit"]) if hf else None
    tokenizer = data.load_tokenizer(DATA_DIR / "tokenizer")
    log, log_columns = [], ["step", "loss", "lr"]
    prov = provenance(params, "pretrain", seed=params.pretrain.seed)
    with staged_dir(PRETRAIN_STEPS_DIR) as steps_dir:
        if params.model.source == "scratch":
            seed_everything(params.pretrain.seed)
            model = tiny_gpt_neox(params.model, tokenizer)
            p = params.pretrain
            origin = {"source": "scratch", "steps": p.steps,
                      "train_tokens": p.steps * p.batch_size * params.data.seq_len}
            result = train(model, pretrain_params(params), data.PackedSequences(DATA_DIR, "train", params.data.seq_len),
                           data.PackedSequences(DATA_DIR, "validation", params.data.seq_len), seed=p.seed,
                           desc="pretrain",
                           after_step=step_saver(set(params.frontier.steps), tokenizer, steps_dir, origin, prov))
            model, log, log_columns = result.model, result.state.log, result.log_columns
        else:
            hub_steps(params, tokenizer, steps_dir, prov, step_entries)
            model = device.place(load_causal_lm(checkpoint))
            origin = {"source": "hf", "name": params.model.hf_name, "ref": params.model.hf_revision,
                      "revision": model_entry["commit"],
                      "local_path": params.model.hf_local_path}

    validation = data.TokenSplit(DATA_DIR, "validation")
    docs = [validation.document(i) for i in range(len(validation))]
    nll, count = document_nll(model, docs, validation.eos_id, params.eval.context_length, params.eval.stride,
                              params.eval.batch_size, desc="validation", precision=params.eval.precision)
    # the validation NLL's precision: in this output's provenance and the run record (not in the models' meta)
    eval_prov = {**prov, "precision": device.resolve_precision(params.eval.precision, next(model.parameters()).device)}
    metrics = {"validation_perplexity": perplexity(nll, count), "validation_tokens": int(count.sum()),
               "parameters": count_parameters(model), **origin}
    if params.tokenizer.source == "train_bpe":
        train_split = data.TokenSplit(DATA_DIR, "train")
        metrics["unigram_validation_perplexity"] = unigram_perplexity(train_split.tokens, docs, validation.eos_id,
                                                                      len(tokenizer))
    with staged_dir(model_dir("pretrained")) as out:
        save_causal_lm(model, tokenizer, out, {"arm": "pretrained", "variant": None, **origin, "provenance": prov})
    write_json(METRICS_DIR / "pretrain.json", {**metrics, "provenance": eval_prov})
    log_columns, log, timing = split_log(log_columns, log)
    write_csv(METRICS_DIR / "pretrain_log.csv", log_columns, log)
    seconds = round(time.time() - t0, 1)
    record_run("pretrain", eval_prov, model, seconds=seconds, timing=timing)
    print(f"pretrain: validation perplexity {metrics['validation_perplexity']:.2f}"
          + (f" (unigram {metrics['unigram_validation_perplexity']:.1f})" if "unigram_validation_perplexity" in metrics else "")
          + f", {seconds} s")
    return 0
