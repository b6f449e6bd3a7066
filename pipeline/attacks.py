"""Adversarial token attacks on a causal LM: the examples, a shared token-gradient core, UAT (Wallace et
al. 2019), iterative HotFlip (Ebrahimi et al. 2018), their equal-budget controls, and result summaries.

Example: a window of prompt_tokens + continuation_tokens tokens cut from one document of a split. Loss is
the mean NLL of the continuation tokens only (each predicted from everything before it): never a trigger
token, never a prompt token, never a replaced token.

Gradient-guided step (the same for both attacks, as in GCG, Zou et al. 2023): the first-order estimate of
the loss change for putting token v at position p is (e_v - e_current) . dL/de_p, i.e. the embedding matrix
times the gradient; take the top-k tokens per editable position, draw a batch of single-token candidates
from that pool, score every candidate by the true loss and keep the best if it raises the loss.

Controls at the same budget (same number of true-loss candidate evaluations; no backward passes):
  greedy  the same coordinate search with candidate tokens drawn uniformly from the candidate set;
  random  best of N random perturbations of the attack's size (L random trigger tokens; F random tokens at F
          distinct random prompt positions), N chosen so the forward count equals the attack's.

Budget accounting: "forward_passes" counts sequences scored by the true loss during the search (candidates,
initial triggers); "backward_passes" counts sequences back-propagated for gradients (each also yields the
current loss). Scoring the attack-evaluation examples (clean and final attacked) is the same for every method
and reported separately as "evaluation_forward_passes". All counts follow from params alone, not from the arm.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import TokenSplit
from .device import eval_autocast, resolve_precision

EXAMPLE_SELECTION_SEED = 20190801   # fixed: the same examples for every arm and seed
# independent random streams per method, derived from the run seed
STREAMS = {"uat": 1, "hotflip": 2, "random_uat": 3, "random_hotflip": 4, "greedy_uat": 5, "greedy_hotflip": 6}


# --- examples -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Examples:
    ids: list[str]
    tokens: torch.Tensor          # int64 [N, prompt + continuation]
    prompt_tokens: int
    continuation_tokens: int


def attack_examples(data_dir: str | Path, split: str, count: int, prompt_tokens: int,
                    continuation_tokens: int) -> Examples:
    """`count` non-overlapping windows drawn with a fixed seed from all windows of the split's documents,
    listed in split order (document index, then offset). Id: "<split>:<doc index>:<offset>"."""
    tokens = TokenSplit(data_dir, split)
    width = prompt_tokens + continuation_tokens
    lengths = np.diff(tokens.offsets) - 1                 # document lengths without the trailing EOS
    per_doc = lengths // width
    if int(per_doc.sum()) < count:
        raise ValueError(f"split {split!r} has {int(per_doc.sum())} windows of {width} tokens; "
                         f"{count} examples requested (attack.*_examples)")
    doc_of = np.repeat(np.arange(len(per_doc)), per_doc)
    window_of = np.concatenate([np.arange(n) for n in per_doc])
    chosen = np.sort(np.random.default_rng(EXAMPLE_SELECTION_SEED).choice(len(doc_of), count, replace=False))
    ids, rows = [], []
    for j in chosen:
        doc, offset = int(doc_of[j]), int(window_of[j]) * width
        ids.append(f"{split}:{doc}:{offset}")
        rows.append(tokens.document(doc)[offset: offset + width])
    return Examples(ids, torch.from_numpy(np.stack(rows)), prompt_tokens, continuation_tokens)


def candidate_ids(tokenizer, embedding_rows: int) -> torch.Tensor:
    """Token ids an attack may insert: real tokenizer ids (< len(tokenizer) and < the embedding rows),
    not special. Embedding rows beyond the tokenizer (Pythia pads 50277 -> 50304) are never candidates."""
    limit = min(len(tokenizer), embedding_rows)
    special = set(tokenizer.all_special_ids)
    ids = torch.tensor([i for i in range(limit) if i not in special], dtype=torch.long)
    if len(ids) == 0:
        raise ValueError("empty candidate set")
    return ids


def generator(seed: int, stream: str) -> torch.Generator:
    state = np.random.SeedSequence([seed, STREAMS[stream]]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


# --- the token-gradient core ----------------------------------------------------------------------------

class Scorer:
    """True-loss scoring and one-hot gradients of the continuation NLL, batched, with pass counters.
    Sequences are [N, S]; the last `continuation_tokens` tokens are the only loss targets."""

    def __init__(self, model, continuation_tokens: int, batch_size: int, candidates: torch.Tensor,
                 precision: str = "auto"):
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.precision = precision    # eval.precision: forward passes in bf16 autocast on CUDA, losses in fp32
        self.embedding = model.get_input_embeddings().weight          # [rows, H]
        self.continuation_tokens = continuation_tokens
        self.batch_size = batch_size
        self.candidate_mask = torch.zeros(self.embedding.shape[0], dtype=torch.bool)
        self.candidate_mask[candidates] = True
        self.forward_passes = 0
        self.backward_passes = 0

    def _continuation_nll(self, ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        c = self.continuation_tokens
        kwargs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": ids}
        with eval_autocast(self.precision, self.device):
            logits = self.model(**kwargs, logits_to_keep=c + 1).logits
        logits = logits[:, :-1].float()   # predict the last c tokens
        targets = ids[:, -c:]
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)

    @torch.no_grad()
    def nll(self, ids: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Mean continuation NLL per sequence, float64 on CPU. count=False for evaluation scoring."""
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start: start + self.batch_size].to(self.device)
            out.append(self._continuation_nll(chunk).double().cpu())
        if count:
            self.forward_passes += len(ids)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def flip_scores(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First-order loss change of every token at every editable position, per sequence:
        scores [N, len(positions), rows] = (E g - e_current . g); non-candidates and the current token get
        -inf. Also returns the current loss per sequence [N] (the forward of the gradient pass)."""
        scores, losses = [], []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start: start + self.batch_size].to(self.device)
            embeds = self.embedding[chunk].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                loss = self._continuation_nll(chunk, inputs_embeds=embeds)
                grad, = torch.autograd.grad(loss.sum(), embeds)
            g = grad[:, positions].float()                                   # [B, P, H]
            first_order = g @ self.embedding.float().T                       # [B, P, rows]
            current = chunk[:, positions]
            first_order -= first_order.gather(2, current.unsqueeze(2))
            first_order[..., ~self.candidate_mask.to(self.device)] = -torch.inf
            first_order.scatter_(2, current.unsqueeze(2), -torch.inf)
            scores.append(first_order.cpu())
            losses.append(loss.detach().double().cpu())
        self.backward_passes += len(ids)
        return torch.cat(scores), torch.cat(losses)


def with_trigger(trigger: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Prepend one trigger [L] to every example [N, S] -> [N, L + S]."""
    return torch.cat([trigger.expand(len(tokens), -1), tokens], dim=1)


# --- UAT -----------------------------------------------------------------------------------------------

def _triggered_batch(triggers: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Every trigger [K, L] on every example [N, S] -> [K * N, L + S] (trigger-major)."""
    k, n = len(triggers), len(tokens)
    return torch.cat([triggers.repeat_interleave(n, dim=0), tokens.repeat(k, 1)], dim=1)


def uat_search(scorer: Scorer, tokens: torch.Tensor, candidates: torch.Tensor, trigger_length: int,
               iterations: int, restarts: int, topk: int, candidates_per_step: int, gen: torch.Generator,
               guided: bool, desc: str = "uat") -> dict:
    """Coordinate search for one trigger that maximises the mean continuation NLL over `tokens`.
    Each restart starts from a random trigger; each iteration scores candidates_per_step single-token
    changes (gradient top-k pool if guided, else uniform over the candidate set) and keeps the best if it
    raises the loss. Returns the best restart's trigger and its optimisation loss, plus every restart's."""
    positions = torch.arange(trigger_length)
    history = []
    best = None
    for restart in range(restarts):
        trigger = candidates[torch.randint(len(candidates), (trigger_length,), generator=gen)]
        current = scorer.nll(with_trigger(trigger, tokens)).mean().item()
        trace = [current]
        for _ in tqdm(range(iterations), desc=f"{desc} restart {restart + 1}/{restarts}", leave=False):
            if guided:
                scores, _ = scorer.flip_scores(with_trigger(trigger, tokens), positions)
                pool = scores.mean(dim=0).topk(topk, dim=1).indices                       # [L, topk]
                picks = torch.randperm(trigger_length * topk, generator=gen)[:candidates_per_step]
                pos, tok = picks // topk, pool[picks // topk, picks % topk]
            else:
                pos = torch.randint(trigger_length, (candidates_per_step,), generator=gen)
                tok = candidates[torch.randint(len(candidates), (candidates_per_step,), generator=gen)]
            proposals = trigger.repeat(len(pos), 1)
            proposals[torch.arange(len(pos)), pos] = tok
            losses = scorer.nll(_triggered_batch(proposals, tokens)).view(len(pos), len(tokens)).mean(dim=1)
            top = int(losses.argmax())
            if losses[top].item() > current:
                trigger, current = proposals[top], losses[top].item()
            trace.append(current)
        history.append({"trigger_ids": trigger.tolist(), "opt_nll": current, "trace": trace})
        if best is None or current > best[1]:
            best = (trigger, current)
    return {"trigger": best[0], "opt_nll": best[1], "restarts": history}


def uat_random_search(scorer: Scorer, tokens: torch.Tensor, candidates: torch.Tensor, trigger_length: int,
                      draws: int, gen: torch.Generator, desc: str = "random uat") -> dict:
    """Best of `draws` uniformly random triggers by mean continuation NLL over `tokens`."""
    best = None
    chunk = max(1, scorer.batch_size // len(tokens))
    for start in tqdm(range(0, draws, chunk), desc=desc, leave=False):
        triggers = candidates[torch.randint(len(candidates), (min(chunk, draws - start), trigger_length),
                                            generator=gen)]
        losses = scorer.nll(_triggered_batch(triggers, tokens)).view(len(triggers), len(tokens)).mean(dim=1)
        top = int(losses.argmax())
        if best is None or losses[top].item() > best[1]:
            best = (triggers[top], losses[top].item())
    return {"trigger": best[0], "opt_nll": best[1]}


def uat_random_draws(restarts: int, iterations: int, candidates_per_step: int) -> int:
    """Random triggers giving the same forward count as uat_search: one initial trigger per restart plus
    every candidate of every iteration (each scored on the same examples)."""
    return restarts * (1 + iterations * candidates_per_step)


# --- HotFlip --------------------------------------------------------------------------------------------

def _apply(tokens: torch.Tensor, positions: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
    """tokens [N, S]; positions/new_ids [N, K] -> [N * K, S], each row one example with one change."""
    n, k = positions.shape
    out = tokens.repeat_interleave(k, dim=0)
    out[torch.arange(n * k), positions.reshape(-1)] = new_ids.reshape(-1)
    return out


def hotflip_search(scorer: Scorer, tokens: torch.Tensor, clean_nll: torch.Tensor, prompt_tokens: int,
                   candidates: torch.Tensor, flips: int, topk: int, candidates_per_flip: int,
                   gen: torch.Generator, guided: bool, desc: str = "hotflip") -> dict:
    """Iterative per-example search: `flips` rounds; in each, candidates_per_flip single-token changes at
    prompt positions not yet flipped (gradient top-k pool if guided, else uniform), scored by the true
    loss; the best is kept if it raises the example's loss. Returns final tokens, losses and flips."""
    n = len(tokens)
    current_tokens, current = tokens.clone(), clean_nll.clone()
    flipped = torch.zeros(n, prompt_tokens, dtype=torch.bool)
    history = [[] for _ in range(n)]
    positions = torch.arange(prompt_tokens)
    for _ in tqdm(range(flips), desc=desc, leave=False):
        if guided:
            scores, _ = scorer.flip_scores(current_tokens, positions)               # [N, P, rows]
            pool = scores.topk(topk, dim=2).indices                                 # [N, P, topk]
            draw = torch.rand(n, prompt_tokens, topk, generator=gen)
            draw[flipped] = -1.0                                                    # flipped positions last
            picks = draw.view(n, -1).topk(candidates_per_flip, dim=1).indices       # [N, K], no repeats
            pos = picks // topk
            tok = pool.view(n, -1).gather(1, picks)
        else:
            pos = torch.multinomial((~flipped).float(), candidates_per_flip, replacement=True, generator=gen)
            tok = candidates[torch.randint(len(candidates), (n, candidates_per_flip), generator=gen)]
        losses = scorer.nll(_apply(current_tokens, pos, tok)).view(n, candidates_per_flip)
        top = losses.argmax(dim=1, keepdim=True)
        best_loss = losses.gather(1, top).squeeze(1)
        improve = best_loss > current
        best_pos, best_tok = pos.gather(1, top).squeeze(1), tok.gather(1, top).squeeze(1)
        for i in torch.nonzero(improve).flatten().tolist():
            p = int(best_pos[i])
            history[i].append([p, int(current_tokens[i, p]), int(best_tok[i])])
            current_tokens[i, p] = best_tok[i]
            flipped[i, p] = True
            current[i] = best_loss[i]
    return {"tokens": current_tokens, "nll": current, "flips": history}


def hotflip_random_search(scorer: Scorer, tokens: torch.Tensor, clean_nll: torch.Tensor, prompt_tokens: int,
                          candidates: torch.Tensor, flips: int, draws: int, gen: torch.Generator,
                          desc: str = "random hotflip") -> dict:
    """Per example, the best of `draws` random perturbations with exactly `flips` random tokens at distinct
    random prompt positions (kept only if it beats the clean loss, like an attack's flips)."""
    n = len(tokens)
    current_tokens, current = tokens.clone(), clean_nll.clone()
    history = [[] for _ in range(n)]
    per_chunk = max(1, scorer.batch_size // draws)
    for start in tqdm(range(0, n, per_chunk), desc=desc, leave=False):
        idx = torch.arange(start, min(start + per_chunk, n))
        m = len(idx)
        pos = torch.rand(m, draws, prompt_tokens, generator=gen).argsort(dim=2)[:, :, :flips]   # [m, D, F]
        tok = candidates[torch.randint(len(candidates), (m, draws, flips), generator=gen)]
        perturbed = tokens[idx].repeat_interleave(draws, dim=0)                                # [m*D, S]
        perturbed.scatter_(1, pos.reshape(m * draws, flips), tok.reshape(m * draws, flips))
        losses = scorer.nll(perturbed).view(m, draws)
        top = losses.argmax(dim=1)
        for j, i in enumerate(idx.tolist()):
            d = int(top[j])
            if losses[j, d].item() > current[i].item():
                current[i] = losses[j, d]
                current_tokens[i] = perturbed[j * draws + d]
                history[i] = [[int(p), int(tokens[i, p]), int(t)] for p, t in zip(pos[j, d], tok[j, d])]
    return {"tokens": current_tokens, "nll": current, "flips": history}


def apply_flips(tokens: torch.Tensor, flips: list[list[list[int]]]) -> torch.Tensor:
    """Replay recorded flips [[position, old_id, new_id], ...] (distinct positions) on the same examples;
    every old id must match the example's token there."""
    if len(flips) != len(tokens):
        raise ValueError(f"{len(flips)} flip lists for {len(tokens)} examples")
    out = tokens.clone()
    for i, example_flips in enumerate(flips):
        for position, old_id, new_id in example_flips:
            if int(tokens[i, position]) != old_id:
                raise ValueError(f"example {i}: flip at {position} expects token {old_id}, "
                                 f"found {int(tokens[i, position])}")
            out[i, position] = new_id
    return out


# --- results --------------------------------------------------------------------------------------------

def summarize(ids: list[str], clean: torch.Tensor, attacked: torch.Tensor, threshold_nats: float,
              threshold_relative: float, budget: dict, per_example_extra: list[dict] | None = None) -> dict:
    """The result shape shared by every attack and control: {"summary": ..., "examples": [...]}."""
    clean64, attacked64 = clean.double(), attacked.double()
    abs_inc = attacked64 - clean64
    rel_inc = abs_inc / clean64
    examples = []
    for i, example_id in enumerate(ids):
        row = {"id": example_id, "clean_nll": clean64[i].item(), "attacked_nll": attacked64[i].item(),
               "abs_increase": abs_inc[i].item(), "rel_increase": rel_inc[i].item(),
               "success_abs": bool(abs_inc[i] >= threshold_nats),
               "success_rel": bool(rel_inc[i] >= threshold_relative)}
        if per_example_extra is not None:
            row.update(per_example_extra[i])
        examples.append(row)
    summary = {"clean_nll": clean64.mean().item(), "attacked_nll": attacked64.mean().item(),
               "abs_increase": abs_inc.mean().item(), "rel_increase": rel_inc.mean().item(),
               "success_rate_abs": (abs_inc >= threshold_nats).double().mean().item(),
               "success_rate_rel": (rel_inc >= threshold_relative).double().mean().item(),
               "examples": len(ids), "budget": {"forward_passes": int(budget["forward_passes"]),
                                                "backward_passes": int(budget["backward_passes"])}}
    return {"summary": summary, "examples": examples}


# --- methods: search on the optimisation examples, evaluate on the evaluation examples -----------------

@dataclass
class AttackSetup:
    """Everything an attack stage needs for one arm: model, tokenizer, candidate ids, both example sets
    and the clean loss of the evaluation examples."""
    model: object
    meta: dict
    tokenizer: object
    candidates: torch.Tensor
    opt: Examples
    eval: Examples
    clean_nll: torch.Tensor
    precision: str                # eval.precision as resolved on the model's device ("bf16" or "fp32")


def load_setup(params, arm: str, seed: int, data_dir: str | Path | None = None) -> AttackSetup:
    from . import paths
    from .data import load_tokenizer
    from .loading import load_arm_model

    data_dir = Path(data_dir or paths.DATA_DIR)
    a = params.attack
    model, meta = load_arm_model(params, arm, seed)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    candidates = candidate_ids(tokenizer, model.get_input_embeddings().weight.shape[0])
    opt = attack_examples(data_dir, "attack_opt", a.opt_examples, a.prompt_tokens, a.continuation_tokens)
    evaluation = attack_examples(data_dir, "attack_eval", a.eval_examples, a.prompt_tokens, a.continuation_tokens)
    precision = resolve_precision(params.eval.precision, next(model.parameters()).device)
    clean = Scorer(model, a.continuation_tokens, a.batch_size, candidates, precision).nll(evaluation.tokens, count=False)
    return AttackSetup(model, meta, tokenizer, candidates, opt, evaluation, clean, precision)


def _scorer(setup: AttackSetup, a, batch_size: int | None = None) -> Scorer:
    return Scorer(setup.model, a.continuation_tokens, batch_size or a.batch_size, setup.candidates, setup.precision)


def _uat_result(setup: AttackSetup, a, scorer: Scorer, found: dict) -> dict:
    trigger = found["trigger"]
    attacked = scorer.nll(with_trigger(trigger, setup.eval.tokens), count=False)
    result = summarize(setup.eval.ids, setup.clean_nll, attacked, a.success_threshold_nats,
                       a.success_threshold_relative,
                       {"forward_passes": scorer.forward_passes, "backward_passes": scorer.backward_passes})
    result.update({"trigger_ids": trigger.tolist(), "trigger_text": setup.tokenizer.decode(trigger.tolist()),
                   "opt_nll": found["opt_nll"], "opt_examples": len(setup.opt.ids),
                   "evaluation_forward_passes": 2 * len(setup.eval.ids)})
    return result


def run_uat(setup: AttackSetup, a, seed: int, method: str) -> dict:
    """method: "gradient" (UAT), "greedy" (uniform candidates, same loop) or "random" (best random trigger)."""
    u = a.uat
    scorer = _scorer(setup, a, u.batch_size)
    if method == "random":
        found = uat_random_search(scorer, setup.opt.tokens, setup.candidates, u.trigger_length,
                                  uat_random_draws(u.restarts, u.iterations, u.candidates_per_step),
                                  generator(seed, "random_uat"))
    else:
        guided = method == "gradient"
        found = uat_search(scorer, setup.opt.tokens, setup.candidates, u.trigger_length, u.iterations,
                           u.restarts, u.topk, u.candidates_per_step,
                           generator(seed, "uat" if guided else "greedy_uat"), guided, desc=f"{method} uat")
    result = _uat_result(setup, a, scorer, found)
    if "restarts" in found:
        result["restarts"] = found["restarts"]
    return result


def run_hotflip(setup: AttackSetup, a, seed: int, method: str) -> dict:
    """method: "gradient" (HotFlip), "greedy" (uniform candidates, same loop) or "random" (best of N
    random perturbations with the same number of flips)."""
    h = a.hotflip
    scorer = _scorer(setup, a)
    tokens = setup.eval.tokens
    if method == "random":
        found = hotflip_random_search(scorer, tokens, setup.clean_nll, a.prompt_tokens, setup.candidates,
                                      h.flips, h.flips * h.candidates_per_flip, generator(seed, "random_hotflip"))
    else:
        guided = method == "gradient"
        found = hotflip_search(scorer, tokens, setup.clean_nll, a.prompt_tokens, setup.candidates, h.flips,
                               h.topk, h.candidates_per_flip, generator(seed, "hotflip" if guided else "greedy_hotflip"),
                               guided, desc=f"{method} hotflip")
    # the reported attacked loss is re-measured on the final tokens, in the same batches as the clean loss
    attacked = scorer.nll(found["tokens"], count=False)
    result = summarize(setup.eval.ids, setup.clean_nll, attacked, a.success_threshold_nats,
                       a.success_threshold_relative,
                       {"forward_passes": scorer.forward_passes, "backward_passes": scorer.backward_passes},
                       [{"flips": f} for f in found["flips"]])
    result["evaluation_forward_passes"] = 2 * len(setup.eval.ids)
    return result


def write_result(params, name: str, arm: str, seed: int, setup: AttackSetup, result: dict, started: float) -> float:
    """Stamp a result with its arm, seed, model meta and provenance and write it to
    attacks/<arm>-s<seed>/<name>.json; the compute seconds since `started` go to the run record.
    Returns those seconds."""
    from .io import write_json
    from .paths import attack_dir, run_name
    from .provenance import provenance, record_run

    prov = provenance(params, name, seed=seed, arm=arm, precision=setup.precision)
    result.update({"arm": arm, "seed": seed, "model_meta": setup.meta, "provenance": prov})
    write_json(attack_dir(arm, seed) / f"{name}.json", result)
    seconds = round(time.time() - started, 1)
    record_run(f"{name}-{run_name(arm, seed)}", prov, setup.model, seconds=seconds)
    return seconds
