"""Adversarial token attacks on a causal LM, as pure algorithms: the examples, a shared token-gradient core,
UAT (Wallace et al. 2019) and HotFlip (Ebrahimi et al. 2018) as GCG-style searches (Zou et al. 2023), their
equal-budget controls, exhaustive oracles for tiny models, and result summaries. Setup, I/O and method
dispatch live in pipeline/assessment.py.

Example: a window of prompt_tokens + continuation_tokens tokens cut from one document of a split. Loss is
the mean NLL of the continuation tokens only (each predicted from everything before it): never a trigger
token, never a prompt token, never a replaced token. A UAT trigger sits before the prompt (placement
"prefix") or between prompt and continuation ("before_continuation").

Gradient-guided step (the same for both attacks): the first-order estimate of the loss change for putting
token v at position p is (e_v - e_current) . dL/de_p; the top-k tokens of every editable position form one
pool, a large batch of single-token changes is drawn from the whole pool without repeats, every one is
scored by the true loss, and the best is kept if it raises the loss. A search runs until `patience` steps
in a row bring no improvement, or its hard step cap. UAT's trigger, and so its gradient, is unchanged after a
step without improvement: it takes no new gradient and draws only changes not yet scored; a trigger whose
whole pool scored without improvement ends the restart. HotFlip may revisit positions: at most `flips`
positions differ from the original at any time: at the edit budget only changed positions are refined, and
after a step without improvement a change at a new position is tried too, reverting one changed position (an
edit moves).
Every gradient step also records the rank correlation between the first-order scores of the candidates
it scored and their true loss changes (a gradient-masking diagnostic).

Targeted (GCG's objective, Zou et al. 2023, on a base LM): HotFlip's search, pool and edit budget on the
prompt, maximising the log-likelihood of a target (another example's continuation, targeted_examples) in place
of the continuation's NLL; success is exact: greedy decoding of the attacked prompt emits the target's first
tokens (Scorer.greedy_match). Its control is HotFlip's random one on the same objective.

Controls: greedy is the same search with candidates drawn uniformly from the candidate set (no gradients);
random is the best of N random perturbations of the attack's size (L random trigger tokens; `flips` random
tokens at distinct random prompt positions), N giving the gradient attack's hard forward cap.

Budget accounting: "forward_passes" counts sequences scored by the true loss during the search (candidates,
initial triggers); "backward_passes" counts sequences back-propagated for gradients (each also yields the
current loss). Searches may stop early (patience), so the summary records the passes actually used in
"budget" and the hard cap, which follows from params alone and is the same for every arm and every method
of an attack, in "budget_limit". Each search also records its budget curve (best loss increase against
forward passes), so methods and arms can be compared at any equal forward count.

Resumable searches: the searches and the random controls take a keyword-only `should_stop` callable, polled
before every step (a control's: every chunk of draws), and a `store`; when it fires, the search saves its
whole state (tokens, triggers, RNG, pass counters, traces) to the store and raises SearchStopped; called again
with the same store it resumes and ends bit-identical to an uninterrupted run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from .data import TokenSplit
from .device import eval_autocast
from .evaluation import token_nll
from .io import atomic_torch_save

EXAMPLE_SELECTION_SEED = 20190801   # fixed: the same examples for every arm and seed
# independent random streams per method, derived from the run seed
STREAMS = {"uat": 1, "hotflip": 2, "random_uat": 3, "random_hotflip": 4, "greedy_uat": 5, "greedy_hotflip": 6,
           "targeted": 7, "random_targeted": 8}
CURVE_POINTS = 16                   # points of a random control's budget curve


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


def targeted_examples(examples: Examples, target_tokens: int) -> tuple[Examples, list[str]]:
    """Example i's prompt followed by its target, the first `target_tokens` tokens of example i + 1's continuation
    (the last example's: the first's), and the ids the targets come from. A target is text that follows some
    other prompt of the split: fluent, and not what this prompt predicts."""
    following = torch.roll(examples.tokens, -1, dims=0)
    p = examples.prompt_tokens
    tokens = torch.cat([examples.tokens[:, :p], following[:, p: p + target_tokens]], dim=1)
    sources = examples.ids[1:] + examples.ids[:1]
    return Examples(examples.ids, tokens, p, target_tokens), sources


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
    """True-loss scoring and one-hot gradients of the objective, batched, with pass counters. Sequences are
    [N, S]; the last `continuation_tokens` tokens are the only loss targets. The objective, which the searches
    maximise, is the continuation's mean NLL; `targeted`: its negative, so a search makes the model produce
    the continuation (GCG's objective)."""

    def __init__(self, model, continuation_tokens: int, batch_size: int, candidates: torch.Tensor,
                 precision: str = "auto", targeted: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.precision = precision    # eval.precision: forward passes in bf16 autocast on CUDA, losses in fp32
        self.embedding = model.get_input_embeddings().weight          # [rows, H]
        self.continuation_tokens = continuation_tokens
        self.batch_size = batch_size
        self.candidate_mask = torch.zeros(self.embedding.shape[0], dtype=torch.bool)
        self.candidate_mask[candidates] = True
        self.sign = -1.0 if targeted else 1.0
        self.forward_passes = 0
        self.backward_passes = 0

    def counters(self) -> list[int]:
        return [self.forward_passes, self.backward_passes]

    def restore(self, counters: list[int]) -> None:
        self.forward_passes, self.backward_passes = (int(c) for c in counters)

    def _continuation_nll(self, ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
                          cache: DynamicCache | None = None) -> torch.Tensor:
        """With `cache` (keys and values of each row's first tokens) only the rest of each row is run."""
        c = self.continuation_tokens
        if inputs_embeds is not None:
            kwargs = {"inputs_embeds": inputs_embeds}
        elif cache is not None:
            kwargs = {"input_ids": ids[:, cache.get_seq_length():], "cache": cache}
        else:
            kwargs = {"input_ids": ids}
        with eval_autocast(self.precision, self.device):
            logits = self.model(**kwargs, logits_to_keep=c + 1).logits
        logits = logits[:, :-1].float()   # predict the last c tokens
        targets = ids[:, -c:]
        return self.sign * token_nll(logits, targets).mean(dim=1)

    @torch.no_grad()
    def nll(self, ids: torch.Tensor, count: bool = True) -> torch.Tensor:
        """The objective per sequence (mean continuation NLL; targeted: its negative), float64 on CPU.
        count=False for evaluation scoring."""
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start: start + self.batch_size].to(self.device)
            out.append(self._continuation_nll(chunk).double().cpu())
        if count:
            self.forward_passes += len(ids)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    @torch.no_grad()
    def trigger_nll(self, triggers: torch.Tensor, tokens: torch.Tensor, at: int) -> torch.Tensor:
        """Mean continuation NLL of every trigger [K, L] inserted before token `at` of every example [N, S]:
        [K, N], float64 on CPU. The examples' first `at` tokens precede every trigger, so their keys and values
        are computed once per call and reused by all K triggers (the numbers of scoring whole sequences)."""
        rows = _triggered_batch(triggers, tokens, at)               # trigger-major: row r is example r % N
        if at == 0:
            return self.nll(rows).view(len(triggers), len(tokens))
        with eval_autocast(self.precision, self.device):
            prompts = self.model(input_ids=tokens[:, :at].to(self.device), use_cache=True, logits_to_keep=1).cache
        shared = [(keys, values) for keys, values, *_ in prompts]
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start: start + self.batch_size].to(self.device)
            example = torch.arange(start, start + len(chunk), device=self.device) % len(tokens)
            cache = DynamicCache([(keys[example], values[example]) for keys, values in shared],
                                 config=self.model.config)
            out.append(self._continuation_nll(chunk, cache=cache).double().cpu())
        self.forward_passes += len(rows)
        return torch.cat(out).view(len(triggers), len(tokens))

    @torch.no_grad()
    def greedy_match(self, ids: torch.Tensor, tokens: int) -> torch.Tensor:
        """Per sequence, whether greedy decoding from everything before the continuation emits its first `tokens`
        tokens: teacher-forced, each is the argmax given those before it, which by induction is what greedy
        decoding emits (one forward instead of `tokens`). Uncounted: a measurement, not a search's."""
        c = self.continuation_tokens
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start: start + self.batch_size].to(self.device)
            with eval_autocast(self.precision, self.device):
                logits = self.model(input_ids=chunk, logits_to_keep=c + 1).logits
            emitted = logits[:, :tokens].argmax(dim=-1)
            out.append((emitted == chunk[:, -c:][:, :tokens]).all(dim=1).cpu())
        return torch.cat(out)

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


def trigger_offset(placement: str, prompt_tokens: int) -> int:
    """Where a trigger goes in an example: before the prompt, or between prompt and continuation."""
    return {"prefix": 0, "before_continuation": prompt_tokens}[placement]


def with_trigger(trigger: torch.Tensor, tokens: torch.Tensor, at: int = 0) -> torch.Tensor:
    """Insert one trigger [L] into every example [N, S] before token `at` -> [N, L + S]."""
    return torch.cat([tokens[:, :at], trigger.expand(len(tokens), -1), tokens[:, at:]], dim=1)


def _triggered_batch(triggers: torch.Tensor, tokens: torch.Tensor, at: int) -> torch.Tensor:
    """Every trigger [K, L] in every example [N, S] -> [K * N, L + S] (trigger-major)."""
    k, n = len(triggers), len(tokens)
    rows = tokens.repeat(k, 1)
    return torch.cat([rows[:, :at], triggers.repeat_interleave(n, dim=0), rows[:, at:]], dim=1)


def rank_correlation(predicted: torch.Tensor, actual: torch.Tensor) -> float | None:
    """Spearman correlation (ranks without tie correction); None for fewer than 3 finite pairs."""
    keep = torch.isfinite(predicted) & torch.isfinite(actual)
    if int(keep.sum()) < 3:
        return None
    ranks = [v[keep].double().argsort().argsort().double() for v in (predicted, actual)]
    centred = [r - r.mean() for r in ranks]
    denom = (centred[0].norm() * centred[1].norm()).item()
    return float((centred[0] @ centred[1]).item() / denom) if denom > 0 else None


# --- resumable search driver ----------------------------------------------------------------------------

class SearchStopped(Exception):
    """should_stop fired: the search's state is in its store and the next call with that store resumes."""


def never() -> bool:
    return False


class StateStore:
    """One search's resumable state in one file: tensors, numbers, lists and dicts (torch.save, loaded
    with weights_only=True), written atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=True) if self.path.exists() else None

    def save(self, state: dict) -> None:
        atomic_torch_save(self.path, state)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _drive(initial: dict, advance, finished, *, scorer: Scorer, gen: torch.Generator, should_stop,
           store: StateStore | None) -> dict:
    """Run advance(state) until finished(state), resuming from the store's state if it holds one; when
    should_stop() fires, save the state with the RNG and pass counters and raise SearchStopped."""
    state = store.load() if store is not None else None
    if state is None:
        state = initial
    else:
        gen.set_state(state.pop("rng"))
        scorer.restore(state.pop("counters"))
    while not finished(state):
        if should_stop():
            if store is not None:
                store.save({**state, "rng": gen.get_state(), "counters": scorer.counters()})
            raise SearchStopped
        advance(state)
    return state


def _point(state: dict, scorer: Scorer, value: float) -> None:
    state["curve"].append([scorer.forward_passes, value])


# --- UAT -----------------------------------------------------------------------------------------------

def uat_search(scorer: Scorer, tokens: torch.Tensor, *, candidates: torch.Tensor, uat, at: int,
               gen: torch.Generator, guided: bool, should_stop=never, store: StateStore | None = None) -> dict:
    """Coordinate search for one trigger that maximises the mean continuation NLL over `tokens`, with
    the trigger inserted at `at`. `uat`: UATParams (trigger_length, restarts, iterations = the hard step
    cap per restart, patience, topk, candidates_per_step). Each restart starts from a random trigger.
    Returns the best restart's trigger and loss, every restart's, the budget curve of the best loss so far
    (mean over `tokens`) and, when guided, the first-order rank correlation of every step."""
    positions = torch.arange(at, at + uat.trigger_length)

    def advance(s):
        if s["trigger"] is None:
            s["trigger"] = candidates[torch.randint(len(candidates), (uat.trigger_length,), generator=gen)]
            s["current"] = scorer.nll(with_trigger(s["trigger"], tokens, at)).mean().item()
            s.update(step=0, stale=0, trace=[s["current"]], pool=None)
        elif s["step"] < uat.iterations and s["stale"] < uat.patience:
            _uat_step(s, scorer, tokens, candidates, uat, at, positions, gen, guided)
        else:
            s["restarts"].append({"trigger_ids": s["trigger"].tolist(), "opt_nll": s["current"], "trace": s["trace"]})
            if s["best"] is None or s["current"] > s["best"][1]:
                s["best"] = [s["trigger"], s["current"]]
            s.update(trigger=None, restart=s["restart"] + 1)
            return
        best = s["current"] if s["best"] is None else max(s["best"][1], s["current"])
        _point(s, scorer, best)

    initial = {"restart": 0, "trigger": None, "current": 0.0, "step": 0, "stale": 0, "trace": [], "pool": None,
               "restarts": [], "best": None, "curve": [], "correlations": []}
    s = _drive(initial, advance, lambda s: s["restart"] >= uat.restarts, scorer=scorer, gen=gen,
               should_stop=should_stop, store=store)
    return {"trigger": s["best"][0], "opt_nll": s["best"][1], "restarts": s["restarts"], "curve": s["curve"],
            "correlations": s["correlations"]}


def _uat_step(s: dict, scorer: Scorer, tokens, candidates, uat, at: int, positions, gen, guided: bool) -> None:
    trigger, length = s["trigger"], uat.trigger_length
    if guided:
        pos, tok, predicted = _uat_pool_draw(s, scorer, tokens, uat, at, positions, gen)
        if len(pos) == 0:              # every change in the pool scored without improvement: a local optimum
            s["stale"] = uat.patience
            return
    else:
        pos = torch.randint(length, (uat.candidates_per_step,), generator=gen)
        tok = candidates[torch.randint(len(candidates), (uat.candidates_per_step,), generator=gen)]
    proposals = trigger.repeat(len(pos), 1)
    proposals[torch.arange(len(pos)), pos] = tok
    losses = scorer.trigger_nll(proposals, tokens, at).mean(dim=1)
    if guided:
        s["correlations"].append(rank_correlation(predicted, losses - s["current"]))
    top_i = int(losses.argmax())
    if losses[top_i].item() > s["current"]:
        s.update(trigger=proposals[top_i], current=losses[top_i].item(), stale=0, pool=None)
    else:
        s["stale"] += 1
    s["step"] += 1
    s["trace"].append(s["current"])


def _uat_pool_draw(s: dict, scorer: Scorer, tokens, uat, at: int, positions, gen):
    """Up to candidates_per_step single-token changes drawn without repeats from the trigger's gradient pool
    (topk tokens per position) among those not yet scored against this trigger: (positions, tokens,
    first-order scores). The pool's gradient pass runs once per trigger; a step without improvement leaves
    the trigger and so its gradient unchanged, and draws the next untried changes instead."""
    if s.get("pool") is None:
        scores, _ = scorer.flip_scores(with_trigger(s["trigger"], tokens, at), positions)
        top = scores.mean(dim=0).topk(uat.topk, dim=1)                                # [L, topk]
        s["pool"] = {"tokens": top.indices, "scores": top.values,
                     "tried": torch.zeros(uat.trigger_length * uat.topk, dtype=torch.bool)}
    pool = s["pool"]
    untried = torch.nonzero(~pool["tried"]).flatten()
    picks = untried[torch.randperm(len(untried), generator=gen)[:uat.candidates_per_step]]
    pool["tried"][picks] = True
    return picks // uat.topk, pool["tokens"].view(-1)[picks], pool["scores"].view(-1)[picks]


def uat_random_search(scorer: Scorer, tokens: torch.Tensor, *, candidates: torch.Tensor, trigger_length: int,
                      draws: int, at: int, gen: torch.Generator, should_stop=never,
                      store: StateStore | None = None) -> dict:
    """Best of `draws` uniformly random triggers by mean continuation NLL over `tokens`, with its curve.
    Resumable between chunks of triggers, like the searches."""
    chunk = max(1, scorer.batch_size // len(tokens))

    def advance(s):
        triggers = candidates[torch.randint(len(candidates), (min(chunk, draws - s["start"]), trigger_length),
                                            generator=gen)]
        losses = scorer.trigger_nll(triggers, tokens, at).mean(dim=1)
        top = int(losses.argmax())
        if s["best"] is None or losses[top].item() > s["best"][1]:
            s["best"] = [triggers[top], losses[top].item()]
        s["start"] += chunk
        _point(s, scorer, s["best"][1])

    s = _drive({"start": 0, "best": None, "curve": []}, advance, lambda s: s["start"] >= draws, scorer=scorer,
               gen=gen, should_stop=should_stop, store=store)
    return {"trigger": s["best"][0], "opt_nll": s["best"][1], "curve": s["curve"]}


def uat_forward_cap(uat, examples: int) -> int:
    """The hard forward cap of uat_search: one initial trigger per restart plus every candidate of every
    step, each scored on every example. Also the random control's forward count."""
    return uat.restarts * (1 + uat.iterations * uat.candidates_per_step) * examples


# --- HotFlip --------------------------------------------------------------------------------------------

def hotflip_search(scorer: Scorer, tokens: torch.Tensor, clean_nll: torch.Tensor, *, prompt_tokens: int,
                   candidates: torch.Tensor, hotflip, gen: torch.Generator, guided: bool, should_stop=never,
                   store: StateStore | None = None) -> dict:
    """Per-example search over the prompt tokens. `hotflip`: HotFlipParams (flips = edit budget: positions
    that may differ from the original at once, steps = hard step cap, patience, topk,
    candidates_per_flip = candidates scored per example and step). An example stops after `patience`
    steps without improvement. Returns final tokens, losses, flips ([position, original, new] per changed
    position), the budget curve (mean NLL increase over the examples) and per-step rank correlations."""
    initial = {"tokens": tokens.clone(), "current": clean_nll.clone(), "stale": torch.zeros(len(tokens), dtype=torch.long),
               "step": 0, "curve": [], "correlations": []}

    def finished(s):
        return s["step"] >= hotflip.steps or bool((s["stale"] >= hotflip.patience).all())

    def advance(s):
        _hotflip_step(s, scorer, tokens, prompt_tokens, candidates, hotflip, gen, guided)
        _point(s, scorer, (s["current"] - clean_nll).mean().item())

    s = _drive(initial, advance, finished, scorer=scorer, gen=gen, should_stop=should_stop, store=store)
    return {"tokens": s["tokens"], "nll": s["current"], "flips": diff_flips(tokens, s["tokens"]),
            "curve": s["curve"], "correlations": s["correlations"]}


def _hotflip_candidates(cur, allowed, scorer, candidates, hotflip, gen, guided):
    """(positions, tokens, valid, first-order scores or None), each [n, candidates_per_flip]."""
    n, p = allowed.shape
    k = hotflip.candidates_per_flip
    if guided:
        scores, _ = scorer.flip_scores(cur, torch.arange(p))
        top = scores.topk(hotflip.topk, dim=2)                                     # [n, P, topk]
        priority = torch.rand(n, p, hotflip.topk, generator=gen)
        priority[~allowed] = -1.0                                                  # edit budget
        chosen = priority.view(n, -1).topk(k, dim=1)
        predicted = top.values.view(n, -1).gather(1, chosen.indices)
        valid = (chosen.values >= 0) & torch.isfinite(predicted)
        return chosen.indices // hotflip.topk, top.indices.view(n, -1).gather(1, chosen.indices), valid, predicted
    pos = torch.multinomial(allowed.float(), k, replacement=True, generator=gen)
    tok = candidates[torch.randint(len(candidates), (n, k), generator=gen)]
    return pos, tok, tok != cur.gather(1, pos), None


def _hotflip_step(s: dict, scorer: Scorer, original, prompt_tokens: int, candidates, hotflip, gen, guided) -> None:
    active = torch.nonzero(s["stale"] < hotflip.patience).flatten()
    cur = s["tokens"][active]
    changed = cur[:, :prompt_tokens] != original[active, :prompt_tokens]
    # at the edit budget only changed positions are refined; after a step without improvement every position is
    # open again, a change at a new one moving an edit (_within_budget)
    stuck = s["stale"][active].unsqueeze(1) > 0
    allowed = changed | (changed.sum(dim=1, keepdim=True) < hotflip.flips) | stuck
    pos, tok, valid, predicted = _hotflip_candidates(cur, allowed, scorer, candidates, hotflip, gen, guided)
    rows, cols = torch.nonzero(valid, as_tuple=True)
    seqs = cur[rows].clone()
    seqs[torch.arange(len(rows)), pos[rows, cols]] = tok[rows, cols]
    _within_budget(seqs, original[active[rows]], changed[rows], pos[rows, cols], hotflip.flips, gen)
    losses = torch.full(valid.shape, -torch.inf, dtype=torch.float64)
    losses[rows, cols] = scorer.nll(seqs)
    current = s["current"][active]
    if predicted is not None:
        rho = [rank_correlation(predicted[i][valid[i]], losses[i][valid[i]] - current[i]) for i in range(len(active))]
        rho = [r for r in rho if r is not None]
        s["correlations"].append(float(np.mean(rho)) if rho else None)
    best, top = losses.max(dim=1)
    improve = best > current
    index = torch.full(valid.shape, -1, dtype=torch.long)
    index[rows, cols] = torch.arange(len(rows))
    for j in torch.nonzero(improve).flatten().tolist():
        i = int(active[j])
        s["tokens"][i] = seqs[index[j, top[j]]]
        s["current"][i] = best[j]
    s["stale"][active] = torch.where(improve, 0, s["stale"][active] + 1)
    s["step"] += 1


def _within_budget(seqs, original, changed, positions, flips: int, gen) -> None:
    """A candidate that changes a new position of an example already at its edit budget reverts one of the
    example's changed positions (drawn at random): the search can move an edit, not only refine it, and at most
    `flips` positions differ from the original. In place; draws nothing while no example is at the budget."""
    moves = (changed.sum(dim=1) >= flips) & ~changed.gather(1, positions.unsqueeze(1)).squeeze(1)
    if not bool(moves.any()):
        return
    revert = torch.multinomial(changed[moves].float(), 1, generator=gen).squeeze(1)
    rows = torch.nonzero(moves).flatten()
    seqs[rows, revert] = original[rows, revert]


def diff_flips(original: torch.Tensor, attacked: torch.Tensor) -> list[list[list[int]]]:
    """Per example, [position, original id, new id] for every position where the two differ."""
    return [[[p, int(o[p]), int(a[p])] for p in torch.nonzero(o != a).flatten().tolist()]
            for o, a in zip(original, attacked)]


def hotflip_random_search(scorer: Scorer, tokens: torch.Tensor, clean_nll: torch.Tensor, *, prompt_tokens: int,
                          candidates: torch.Tensor, flips: int, draws: int, gen: torch.Generator, should_stop=never,
                          store: StateStore | None = None) -> dict:
    """Per example, the best of `draws` random perturbations with exactly `flips` random tokens at distinct
    random prompt positions (kept only if it beats the clean loss, like an attack's flips). Resumable
    between chunks of examples, like the searches."""
    n = len(tokens)
    per_chunk = max(1, scorer.batch_size // draws)

    def advance(s):
        idx = torch.arange(s["start"], min(s["start"] + per_chunk, n))
        m = len(idx)
        pos = torch.rand(m, draws, prompt_tokens, generator=gen).argsort(dim=2)[:, :, :flips]   # [m, D, F]
        tok = candidates[torch.randint(len(candidates), (m, draws, flips), generator=gen)]
        perturbed = tokens[idx].repeat_interleave(draws, dim=0)                                # [m*D, S]
        perturbed.scatter_(1, pos.reshape(m * draws, flips), tok.reshape(m * draws, flips))
        losses = torch.maximum(scorer.nll(perturbed).view(m, draws), clean_nll[idx].unsqueeze(1))
        s["best_so_far"][idx] = losses.cummax(dim=1).values
        top = losses.argmax(dim=1)
        for j, i in enumerate(idx.tolist()):
            if losses[j, top[j]] > clean_nll[i]:
                s["tokens"][i] = perturbed[j * draws + int(top[j])]
        s["start"] += per_chunk

    initial = {"start": 0, "tokens": tokens.clone(), "best_so_far": torch.empty(n, draws, dtype=torch.float64)}
    s = _drive(initial, advance, lambda s: s["start"] >= n, scorer=scorer, gen=gen, should_stop=should_stop,
               store=store)
    best_so_far = s["best_so_far"]
    marks = sorted({max(1, round(draws * (q + 1) / CURVE_POINTS)) for q in range(CURVE_POINTS)})
    curve = [[d * n, (best_so_far[:, d - 1] - clean_nll).mean().item()] for d in marks]
    return {"tokens": s["tokens"], "nll": best_so_far[:, -1].clone(), "flips": diff_flips(tokens, s["tokens"]),
            "curve": curve}


def hotflip_forward_cap(hotflip, examples: int) -> int:
    return hotflip.steps * hotflip.candidates_per_flip * examples


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


# --- exhaustive oracles (tiny models) -------------------------------------------------------------------

def oracle_single_flip(scorer: Scorer, tokens: torch.Tensor, *, prompt_tokens: int,
                       candidates: torch.Tensor) -> dict:
    """Per example, the best single-token change over every prompt position x every candidate
    (prompt_tokens x len(candidates) true-loss forwards per example, counted by the scorer)."""
    grid_pos = torch.arange(prompt_tokens).repeat_interleave(len(candidates))
    grid_tok = candidates.repeat(prompt_tokens)
    best, where = [], []
    for row in tokens:
        seqs = row.repeat(len(grid_pos), 1)
        seqs[torch.arange(len(grid_pos)), grid_pos] = grid_tok
        losses = scorer.nll(seqs)
        top = int(losses.argmax())
        best.append(losses[top].item())
        where.append([int(grid_pos[top]), int(row[grid_pos[top]]), int(grid_tok[top])])
    return {"nll": torch.tensor(best, dtype=torch.float64), "flips": [[w] for w in where]}


def oracle_trigger(scorer: Scorer, tokens: torch.Tensor, *, candidates: torch.Tensor, at: int) -> dict:
    """The best one-token trigger over every candidate by mean continuation NLL over `tokens`."""
    per_trigger = []
    chunk = max(1, scorer.batch_size // len(tokens))
    for start in range(0, len(candidates), chunk):
        triggers = candidates[start: start + chunk].unsqueeze(1)
        per_trigger.append(scorer.trigger_nll(triggers, tokens, at).mean(dim=1))
    losses = torch.cat(per_trigger)
    top = int(losses.argmax())
    return {"trigger": candidates[top: top + 1], "opt_nll": losses[top].item()}


# --- results --------------------------------------------------------------------------------------------

def summarize(ids: list[str], clean: torch.Tensor, attacked: torch.Tensor, threshold_nats: float,
              threshold_relative: float, budget: dict, per_example_extra: list[dict] | None = None,
              budget_limit: dict | None = None) -> dict:
    """The result shape shared by every attack and control: {"summary": ..., "examples": [...]}.
    budget: passes used; budget_limit: the hard cap from params (defaults to the passes used)."""
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
    used = {"forward_passes": int(budget["forward_passes"]), "backward_passes": int(budget["backward_passes"])}
    limit = used if budget_limit is None else {k: int(budget_limit[k]) for k in used}
    summary = {"clean_nll": clean64.mean().item(), "attacked_nll": attacked64.mean().item(),
               "abs_increase": abs_inc.mean().item(), "rel_increase": rel_inc.mean().item(),
               "success_rate_abs": (abs_inc >= threshold_nats).double().mean().item(),
               "success_rate_rel": (rel_inc >= threshold_relative).double().mean().item(),
               "examples": len(ids), "budget": used, "budget_limit": limit}
    return {"summary": summary, "examples": examples}


def curve_at(curve: list[list[float]], forward_passes: int) -> float | None:
    """The best value a budget curve had reached within `forward_passes` (None before its first point)."""
    reached = [v for f, v in curve if f <= forward_passes]
    return max(reached) if reached else None


def mean_correlation(correlations: list) -> float | None:
    values = [c for c in correlations if c is not None]
    return float(np.mean(values)) if values else None
