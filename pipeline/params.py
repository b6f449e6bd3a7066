"""The one typed, validated loader for params.yaml.

Every key is declared here with its type and the values it allows. Loading fails on the first
unknown key, missing key, wrong type, out-of-range value or inconsistent combination, with a
message naming the key, the value and what is allowed, before any stage computes or writes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .arms import TRAINED_ARMS

# constraint variant -> the linear modules it constrains (suffixes of GPT-NeoX / Llama-style module names)
VARIANT_MODULES = {
    "mlp_in": ("mlp.dense_h_to_4h",),
    "mlp_both": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "mlp_in_attn_out": ("mlp.dense_h_to_4h", "attention.dense"),
    "gated_updown": ("mlp.up_proj", "mlp.down_proj"),
    "gated_all": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
VARIANTS = tuple(VARIANT_MODULES)
MONOTONICITY_SCOPE = ("non-negative weights in the constrained linear maps only; the activations (GELU/SiLU) "
                      "are not monotone, so the network is not globally monotone in its input")
INIT_MODES = ("abs", "clamp", "equivalent")
SPLITS = ("train", "validation", "test", "attack_opt", "attack_eval")
HELD_OUT = SPLITS[1:]
PROFILES = ("embedded", "smoke", "rehearsal", "cluster", "cluster-410m", "cluster-160m")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


class ParamsError(ValueError):
    """A bad value in params.yaml: names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"params: invalid value for '{key}': {value!r}; allowed: {allowed}")


class InputError(RuntimeError):
    """An input the params name (a pinned file in the HF hub cache) is missing or damaged: a stage finds
    it before computing, and the CLI reports it in one message (exit 2) with what fixes it."""


class HardwareError(RuntimeError):
    """The job runs on hardware the params refuse (a GPU below device.min_compute_capability)."""


# --- field declarations -----------------------------------------------------------------------

def _spec(allowed: str, check, default=dataclasses.MISSING):
    return field(default=default, metadata={"allowed": allowed, "check": check})


def choice(*options, default=dataclasses.MISSING):
    return _spec("one of " + ", ".join(map(repr, options)), lambda v: v in options, default)


def positive(default=dataclasses.MISSING):
    return _spec("a number > 0", lambda v: v > 0, default)


def nonneg(default=dataclasses.MISSING):
    return _spec("a number >= 0", lambda v: v >= 0, default)


def at_least(lo, default=dataclasses.MISSING):
    return _spec(f"a number >= {lo}", lambda v: v >= lo, default)


def unit_interval(closed_high=False, default=dataclasses.MISSING):
    high = "]" if closed_high else ")"
    return _spec(f"a number in [0, 1{high}",
                 lambda v: 0 <= v <= 1 if closed_high else 0 <= v < 1, default)


def hub_ref(default=dataclasses.MISSING):
    return _spec("a hub ref: a branch, tag or commit, no spaces (`python -m pipeline fetch` resolves it to the "
                 "commit stages read, in refs.lock.yaml)", lambda v: bool(v) and not any(c.isspace() for c in v), default)


SEED_LIMIT = 2 ** 32        # numpy's legacy seeding (np.random.seed, seed_everything) takes seeds below this


def seed_spec(default=dataclasses.MISSING):
    return _spec("an integer in [0, 2**32) (numpy's seeding)", lambda v: 0 <= v < SEED_LIMIT, default)


def anything(default=dataclasses.MISSING):
    return _spec("any value of the declared type", lambda v: True, default)


# --- sections -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataParams:
    source: str = choice("embedded", "hf")
    # hf source: files of a hub dataset repo at a pinned commit, read offline from the HF hub cache
    # (`python -m pipeline fetch` puts them there): train from the named train shards, every held-out
    # split from the held-out files (pipeline/data.py)
    hf_dataset: str = anything()
    hf_revision: str = hub_ref()
    hf_train_files: list = anything()
    hf_heldout_files: list = anything()
    hf_text_field: str = anything()
    hf_cache_dir: typing.Optional[str] = anything()   # null: HF_HUB_CACHE; $VARS are expanded when used
    max_documents: int = nonneg()          # documents in all splits; 0 = every document (embedded only)
    min_chars: int = at_least(1)
    split_seed: int = seed_spec()
    fractions: dict = anything()
    seq_len: int = at_least(8)


@dataclass(frozen=True)
class TokenizerParams:
    source: str = choice("train_bpe", "model")
    vocab_size: int = at_least(260)        # byte alphabet + specials + merges


@dataclass(frozen=True)
class ModelParams:
    source: str = choice("scratch", "hf")
    hf_name: str = anything()
    hf_revision: str = hub_ref()
    hf_local_path: typing.Optional[str] = anything()   # an explicit checkpoint directory; wins over the cache
    hf_cache_dir: typing.Optional[str] = anything()    # null: HF_HUB_CACHE; $VARS are expanded when used
    hidden_size: int = at_least(8)
    num_layers: int = at_least(1)
    num_heads: int = at_least(1)
    intermediate_size: int = at_least(8)
    max_position_embeddings: int = at_least(8)


@dataclass(frozen=True)
class PretrainParams:
    steps: int = at_least(1)
    batch_size: int = at_least(1)
    lr: float = positive()
    warmup_ratio: float = unit_interval()
    weight_decay: float = nonneg()
    seed: int = seed_spec()


@dataclass(frozen=True)
class MonotonicParams:
    variant: str = choice(*VARIANTS)
    init: str = choice(*INIT_MODES)
    eps: float = positive()               # abs: V = softplus^-1(|W| + eps); clamp: W -> max(W, eps); equivalent: min W


@dataclass(frozen=True)
class TrainParams:
    max_steps: int = at_least(1)
    batch_size: int = at_least(1)         # per process, per micro-step
    grad_accum: int = at_least(1)
    lr: float = positive()
    constrained_lr_multiplier: float = positive()
    min_lr_ratio: float = unit_interval(closed_high=True)
    warmup_ratio: float = unit_interval()
    weight_decay: float = nonneg()
    constrained_weight_decay: float = nonneg()   # decay on V pulls W toward softplus(0)=0.69
    adam_beta1: float = unit_interval()
    adam_beta2: float = _spec("a number in (0, 1)", lambda v: 0 < v < 1)
    grad_clip: float = nonneg()           # 0 = no clipping
    precision: str = choice("auto", "fp32", "bf16")
    gradient_checkpointing: bool = anything()
    eval_interval: int = at_least(1)
    eval_batches: int = at_least(1)
    log_interval: int = at_least(1)
    checkpoint_interval: int = at_least(1)
    keep_checkpoints: int = at_least(1)
    max_steps_per_run: int = nonneg()     # 0 = no limit
    wall_clock_limit_s: float = nonneg()  # 0 = no limit
    min_update_norm: float = nonneg()     # a trained group whose total update stays below fails the run
    beyond_one_epoch: str = choice("fail", "warn")   # a run whose budget exceeds the train split's windows
    arm_overrides: dict = anything()      # {arm: {train key: value}}; recorded and flagged loudly


@dataclass(frozen=True)
class LrSelectParams:
    """Equal tuning effort: every trained arm tries the same number of learning rates for the same short
    budget and keeps the one with the lowest validation loss (stages/select_lr.py)."""
    multipliers: list = anything()              # x the arm's train.lr, for an unconstrained arm
    constrained_multipliers: list = anything()  # train.constrained_lr_multiplier values, for the constrained arm
    steps: int = at_least(1)                    # each trial trains this many steps from the arm's start
    seed: int = seed_spec()                     # the trials' data order


@dataclass(frozen=True)
class EvalParams:
    context_length: int = at_least(8)
    stride: int = at_least(1)
    batch_size: int = at_least(1)
    max_documents: int = nonneg()         # 0 = every test document
    precision: str = choice("auto", "fp32", "bf16")   # forward passes of evaluation and attacks (losses in fp32)


@dataclass(frozen=True)
class UATParams:
    trigger_length: int = at_least(1)
    iterations: int = at_least(1)         # hard step cap per restart
    restarts: int = at_least(1)
    patience: int = at_least(1)           # a restart ends after this many steps in a row without improvement
    topk: int = at_least(1)
    candidates_per_step: int = at_least(1)
    batch_size: int = at_least(1)
    placement: str = choice("prefix", "before_continuation")


@dataclass(frozen=True)
class HotFlipParams:
    flips: int = at_least(1)              # edit budget: prompt positions that may differ from the original
    steps: int = at_least(1)              # hard step cap (a step may revisit a changed position)
    patience: int = at_least(1)           # an example stops after this many steps in a row without improvement
    topk: int = at_least(1)
    candidates_per_flip: int = at_least(1)   # candidates scored per example and step


@dataclass(frozen=True)
class TargetedParams:
    target: str = choice("next_example")  # example i's target: the continuation of evaluation example i + 1
    target_tokens: int = at_least(1)      # the target's length; the objective is its mean NLL
    match_tokens: int = at_least(1)       # success: greedy decoding reproduces the target's first match_tokens


ATTACKS = ("uat", "hotflip")            # the untargeted gradient attacks (attack.uat, attack.hotflip)
CONTROLS = ("random", "greedy")         # their controls at the same forward budget
TARGETED = "targeted"                   # GCG's objective with HotFlip's search, and its random control
TARGETED_METHODS = ("gradient", "random")
STEPS = (*ATTACKS, "controls", TARGETED)   # what assess runs on every model: arms and the frontier's checkpoints


@dataclass(frozen=True)
class AttackParams:
    prompt_tokens: int = at_least(1)      # editable prefix of each example
    continuation_tokens: int = at_least(1)  # loss is measured on these tokens only
    opt_examples: int = at_least(1)
    eval_examples: int = at_least(1)
    success_threshold_nats: float = positive()
    success_threshold_relative: float = positive()
    batch_size: int = at_least(1)
    uat: UATParams = anything()
    hotflip: HotFlipParams = anything()
    targeted: TargetedParams = anything()


@dataclass(frozen=True)
class BenchmarksParams:
    tasks: list = anything()              # lm-eval task names; "pipeline_lastword" is the local task
    num_fewshot: int = nonneg()
    limit: int = nonneg()                 # items per task (0 = all)
    batch_size: int = at_least(1)
    local_items: int = nonneg()           # pipeline_lastword items the data stage writes (0 = every fitting one)
    bootstrap_iters: int = nonneg()       # the harness's own stderr bootstrap (0 = none)
    # the harness tasks' datasets: hub snapshots (hub/) and their prepared tables (datasets/) under this one
    # directory, filled by `pipeline fetch` and read offline by the stage; $VARS are expanded when used
    hf_cache_dir: typing.Optional[str] = anything()


@dataclass(frozen=True)
class FrontierParams:
    steps: list = anything()              # pretraining steps of the reference checkpoints (hf: the branches step<N>)
    recovery_steps: list = anything()     # recovery-training steps whose checkpoints (both arms) are measured too


@dataclass(frozen=True)
class AggregateParams:
    bootstrap_samples: int = at_least(100)
    confidence: float = _spec("a number in (0, 1)", lambda v: 0 < v < 1)
    seed: int = seed_spec()
    equivalence_margin_nats: float = positive()   # TOST margin for paired differences in nats/token
    power: float = _spec("a number in (0, 1)", lambda v: 0 < v < 1)   # for the report's detectable difference
    plateau_window: int = at_least(1)     # validations over which recovery must have stopped improving
    plateau_threshold_nats: float = positive()   # ... by less than this drop in validation loss
    # an attack has saturated when its last doubling of forwards added at most this share of its final increase
    saturation_tolerance: float = _spec("a number in (0, 1)", lambda v: 0 < v < 1)
    # reference-curve points closer than this in mean clean NLL are pooled into one (pipeline/frontier.py)
    curve_min_gap_nats: float = nonneg()


@dataclass(frozen=True)
class DeviceParams:
    # a CUDA device below this compute capability is refused at the start of every model stage (the A100 is
    # 8.0: bf16 in hardware; a V100's 7.0 emulates bf16 slowly and computes other numbers); 0 allows any
    min_compute_capability: float = nonneg()


@dataclass(frozen=True)
class Params:
    profile: str = choice(*PROFILES)
    seeds: list = anything()
    data: DataParams = anything()
    tokenizer: TokenizerParams = anything()
    model: ModelParams = anything()
    pretrain: PretrainParams = anything()
    monotonic: MonotonicParams = anything()
    train: TrainParams = anything()
    lr_select: LrSelectParams = anything()
    eval: EvalParams = anything()
    attack: AttackParams = anything()
    benchmarks: BenchmarksParams = anything()
    frontier: FrontierParams = anything()
    aggregate: AggregateParams = anything()
    device: DeviceParams = anything()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        return params_hash(self.to_dict())

    def train_for_arm(self, arm: str) -> TrainParams:
        """The train section for one arm, with its explicit override (if any) applied and typed
        exactly as the section itself (YAML's `1e-3` is a string until validated)."""
        override = self.train.arm_overrides.get(arm, {})
        merged = _build(TrainParams, {**_train_values(self.train), **override, "arm_overrides": {}},
                        f"train.arm_overrides.{arm}")
        return dataclasses.replace(merged, arm_overrides=self.train.arm_overrides)


def _train_values(train: TrainParams) -> dict:
    return {f.name: getattr(train, f.name) for f in dataclasses.fields(TrainParams) if f.name != "arm_overrides"}


def params_hash(raw: dict) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


# --- generic validation -------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value, tp):
    """Check a YAML value against a declared type; ints are accepted where floats are declared."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, str):   # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ParamsError(key, value, "a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ParamsError(key, value, "a finite number")
        return float(value)
    if tp in (str, list, dict):
        if not isinstance(value, tp):
            raise ParamsError(key, value, f"a {_type_name(tp)}")
        return value
    raise TypeError(f"undeclared type {tp} for {key}")


def _build(cls, raw, prefix: str = ""):
    where = prefix or "params.yaml"
    if not isinstance(raw, dict):
        raise ParamsError(where, raw, f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(cls))}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ParamsError(f"{prefix + '.' if prefix else ''}{key}", raw[key],
                              f"no such key under {where}; known keys: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING:
                what = (f"a mapping with keys {', '.join(g.name for g in dataclasses.fields(hints[name]))}"
                        if dataclasses.is_dataclass(hints[name]) else f.metadata["allowed"])
                raise ParamsError(key, "<missing>", f"a required key ({what})")
            values[name] = f.default
            continue
        value = _coerce(key, raw[name], hints[name])
        if value is not None and not dataclasses.is_dataclass(hints[name]) and not f.metadata["check"](value):
            raise ParamsError(key, raw[name], f.metadata["allowed"])
        values[name] = value
    return cls(**values)


# --- cross-field rules --------------------------------------------------------------------------

def _check_consistency(p: Params) -> None:
    if not p.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < SEED_LIMIT for s in p.seeds):
        raise ParamsError("seeds", p.seeds, "a non-empty list of integers in [0, 2**32) (numpy's seeding)")
    if len(set(p.seeds)) != len(p.seeds):
        raise ParamsError("seeds", p.seeds, "distinct seeds")

    fr = p.data.fractions
    if set(fr) != set(SPLITS):
        raise ParamsError("data.fractions", fr, f"exactly the keys {', '.join(SPLITS)}")
    for name, value in fr.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ParamsError(f"data.fractions.{name}", value, "a number in (0, 1)")
    if abs(sum(fr.values()) - 1.0) > 1e-6:
        raise ParamsError("data.fractions", fr, f"fractions summing to 1 (they sum to {sum(fr.values()):.6g})")

    if p.data.source == "hf" and p.tokenizer.source != "model":
        raise ParamsError("tokenizer.source", p.tokenizer.source, "'model' when data.source is 'hf'")
    if p.model.source == "hf":
        if p.tokenizer.source != "model":
            raise ParamsError("tokenizer.source", p.tokenizer.source, "'model' when model.source is 'hf'")
    elif p.tokenizer.source != "train_bpe":
        raise ParamsError("tokenizer.source", p.tokenizer.source, "'train_bpe' when model.source is 'scratch'")
    _check_data_files(p.data)
    if p.model.source == "scratch":
        if p.model.hidden_size % p.model.num_heads:
            raise ParamsError("model.num_heads", p.model.num_heads,
                              f"a divisor of model.hidden_size ({p.model.hidden_size})")
        if p.data.seq_len > p.model.max_position_embeddings:
            raise ParamsError("data.seq_len", p.data.seq_len,
                              f"at most model.max_position_embeddings ({p.model.max_position_embeddings})")
        if p.eval.context_length > p.model.max_position_embeddings:
            raise ParamsError("eval.context_length", p.eval.context_length,
                              f"at most model.max_position_embeddings ({p.model.max_position_embeddings})")
    if p.monotonic.init == "equivalent" and p.monotonic.variant.startswith("gated"):
        raise ParamsError("monotonic.init", "equivalent", "abs or clamp for a gated (RMSNorm) variant: "
                          "the function-preserving shift needs a LayerNorm, which subtracts the mean")
    if p.monotonic.variant.startswith("gated") and p.model.source == "scratch":
        raise ParamsError("monotonic.variant", p.monotonic.variant,
                          "mlp_in, mlp_both or mlp_in_attn_out for the GPT-NeoX model built from scratch")
    if p.eval.stride > p.eval.context_length:
        raise ParamsError("eval.stride", p.eval.stride, f"at most eval.context_length ({p.eval.context_length})")
    _check_attack(p)
    _check_benchmarks(p.benchmarks)

    _check_training(p)
    _check_frontier(p)


def _check_attack(p: Params) -> None:
    a = p.attack
    if a.uat.trigger_length + a.prompt_tokens + a.continuation_tokens > p.eval.context_length:
        raise ParamsError("attack.prompt_tokens", a.prompt_tokens,
                          "prompt + continuation + trigger length within eval.context_length "
                          f"({p.eval.context_length})")
    for section in ATTACKS:        # a pool drawn from the candidate tokens: at most the vocabulary
        topk = getattr(a, section).topk
        if topk >= p.tokenizer.vocab_size:
            raise ParamsError(f"attack.{section}.topk", topk, f"fewer than tokenizer.vocab_size "
                              f"({p.tokenizer.vocab_size}), the tokens a candidate pool is drawn from")
    if a.hotflip.flips > a.prompt_tokens:
        raise ParamsError("attack.hotflip.flips", a.hotflip.flips,
                          f"at most attack.prompt_tokens ({a.prompt_tokens})")
    # candidate batches are drawn without repeats from the gradient pools
    if a.uat.candidates_per_step > a.uat.trigger_length * a.uat.topk:
        raise ParamsError("attack.uat.candidates_per_step", a.uat.candidates_per_step,
                          f"at most trigger_length x topk ({a.uat.trigger_length * a.uat.topk})")
    pool = a.prompt_tokens * a.hotflip.topk
    if a.hotflip.candidates_per_flip > pool:
        raise ParamsError("attack.hotflip.candidates_per_flip", a.hotflip.candidates_per_flip,
                          f"at most prompt_tokens x topk ({pool})")
    t = a.targeted
    if t.target_tokens > a.continuation_tokens:
        raise ParamsError("attack.targeted.target_tokens", t.target_tokens,
                          f"at most attack.continuation_tokens ({a.continuation_tokens}): a target is cut from one")
    if t.match_tokens > t.target_tokens:
        raise ParamsError("attack.targeted.match_tokens", t.match_tokens,
                          f"at most attack.targeted.target_tokens ({t.target_tokens})")
    if a.eval_examples < 2:
        raise ParamsError("attack.eval_examples", a.eval_examples, "at least 2: a target is another example's")
    for section in ATTACKS:
        s = getattr(a, section)
        cap = s.iterations if section == "uat" else s.steps
        if s.patience > cap:
            raise ParamsError(f"attack.{section}.patience", s.patience,
                              f"at most the step cap attack.{section}.{'iterations' if section == 'uat' else 'steps'} ({cap})")


def _check_training(p: Params) -> None:
    train_keys = {f.name for f in dataclasses.fields(TrainParams)} - {"arm_overrides"}
    for arm, override in p.train.arm_overrides.items():
        if arm not in TRAINED_ARMS:
            raise ParamsError(f"train.arm_overrides.{arm}", override, f"an arm among {', '.join(TRAINED_ARMS)}")
        if not isinstance(override, dict):
            raise ParamsError(f"train.arm_overrides.{arm}", override, "a mapping of train keys to values")
        for key in override:
            if key not in train_keys:
                raise ParamsError(f"train.arm_overrides.{arm}.{key}", override[key],
                                  f"a train key ({', '.join(sorted(train_keys))})")
        p.train_for_arm(arm)   # every overridden value passes the same checks as the section's own
    ls = p.lr_select
    for key in ("multipliers", "constrained_multipliers"):
        grid = getattr(ls, key)
        if not grid or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in grid) \
                or len(set(grid)) != len(grid):
            raise ParamsError(f"lr_select.{key}", grid, "a non-empty list of distinct numbers > 0")
    if len(ls.multipliers) != len(ls.constrained_multipliers):
        raise ParamsError("lr_select.constrained_multipliers", ls.constrained_multipliers,
                          f"as many values as lr_select.multipliers ({len(ls.multipliers)}): the same tuning effort "
                          "for every arm")
    shortest = min(p.train_for_arm(arm).max_steps for arm in TRAINED_ARMS)
    if ls.steps > shortest:
        raise ParamsError("lr_select.steps", ls.steps, f"at most train.max_steps ({shortest})")
    t = p.train          # the plateau check reads the validations along recovery, not only the last one
    if t.eval_interval > t.max_steps:
        raise ParamsError("train.eval_interval", t.eval_interval, f"at most train.max_steps ({t.max_steps}): "
                          "only the final validation would run")


def _check_data_files(d: DataParams) -> None:
    """Repository paths of the hf source: relative, .jsonl or .jsonl.zst, each named once, train and
    held-out files disjoint (held-out text must never come from a train shard)."""
    for key in ("hf_train_files", "hf_heldout_files"):
        files = getattr(d, key)
        for f in files:
            if (not isinstance(f, str) or f.startswith("/") or ".." in f.split("/")
                    or not f.endswith((".jsonl", ".jsonl.zst"))):
                raise ParamsError(f"data.{key}", files, "a list of relative repository paths ending in .jsonl or "
                                                        f".jsonl.zst (not {f!r})")
        if not files or len(set(files)) != len(files):
            raise ParamsError(f"data.{key}", files, "a non-empty list of distinct repository paths")
    shared = sorted(set(d.hf_train_files) & set(d.hf_heldout_files))
    if shared:
        raise ParamsError("data.hf_heldout_files", d.hf_heldout_files,
                          f"files disjoint from data.hf_train_files (both name {', '.join(shared)})")
    if d.source == "hf":    # the documents read: train from the train shards, the held-out splits from the others
        try:
            split_counts(d.max_documents, d.fractions)
        except ValueError as exc:
            raise ParamsError("data.max_documents", d.max_documents,
                              f"enough to leave train at least one document when data.source is 'hf' ({exc}; "
                              "every held-out split takes at least one)") from None


def split_counts(n: int, fractions: dict) -> dict[str, int]:
    """Documents per split out of n: every held-out split at least one, train the remainder (ValueError if none
    is left; checked here for the hf source, whose n is data.max_documents)."""
    counts = {s: max(1, int(n * fractions[s])) for s in HELD_OUT}
    train = n - sum(counts.values())
    if train < 1:
        raise ValueError(f"{n} documents leave none for train with data.fractions {fractions}")
    return {"train": train, **counts}


LOCAL_TASK = "pipeline_lastword"   # pipeline/benchmarks.py's own last-word task (named here: no harness import)
def _check_benchmarks(b: BenchmarksParams) -> None:
    if not b.tasks or not all(isinstance(t, str) and t for t in b.tasks) or len(set(b.tasks)) != len(b.tasks):
        raise ParamsError("benchmarks.tasks", b.tasks, f"a non-empty list of distinct lm-eval task names "
                          f"({LOCAL_TASK!r} is the local task)")
    if b.hf_cache_dir is None and any(t != LOCAL_TASK for t in b.tasks):
        raise ParamsError("benchmarks.hf_cache_dir", None, "a directory (e.g. $SCRATCH/hf/tasks) when benchmarks.tasks "
                          "names a harness task: `pipeline fetch` stores its dataset there and the stage reads it")


def _check_frontier(p: Params) -> None:
    """Pretraining steps of the reference curve: distinct, ascending, before the end of pretraining (scratch);
    for model.source hf, the hub branches step<N> (Pythia's intermediate checkpoints), resolved by fetch."""
    f = p.frontier
    for key in ("steps", "recovery_steps"):
        steps = getattr(f, key)
        positive_ints = all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in steps)
        if not positive_ints or steps != sorted(set(steps)):
            raise ParamsError(f"frontier.{key}", steps, "a list of distinct, ascending integers > 0 (may be empty)")
    shortest = min(p.train_for_arm(arm).max_steps for arm in TRAINED_ARMS)
    if f.recovery_steps and f.recovery_steps[-1] >= shortest:
        raise ParamsError("frontier.recovery_steps", f.recovery_steps, f"steps before the end of recovery (train."
                                                                       f"max_steps {shortest}: that is the arm itself)")
    if p.model.source == "scratch" and f.steps and f.steps[-1] >= p.pretrain.steps:
        raise ParamsError("frontier.steps", f.steps, f"steps before the end of pretraining (pretrain.steps "
                                                     f"{p.pretrain.steps}: that checkpoint is the pretrained arm)")


def validate(raw: dict) -> Params:
    params = _build(Params, raw)
    _check_consistency(params)
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue   # SafeLoader's own construct_mapping reports unhashable keys
            if key in seen:
                raise ParamsError(str(key), "<repeated key>",
                                  f"each key once per mapping (repeated at line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(str(path), "<missing file>", "a params.yaml file in the working directory (see README)")
    try:
        raw = yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ParamsError(str(path), "<not UTF-8 text>", f"a UTF-8 YAML file ({exc})") from None
    except yaml.YAMLError as exc:
        raise ParamsError(str(path), "<unparseable YAML>", f"valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ParamsError(str(path), raw, f"a YAML mapping with keys {', '.join(f.name for f in dataclasses.fields(Params))}")
    return validate(raw)


def profile_path(name: str) -> Path:
    return PROFILES_DIR / f"{name}.yaml"
