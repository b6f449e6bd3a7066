"""`python -m pipeline preflight`: will every stage of the current profile fit its GPU and SLURM request?

Per stage kind of dvc.yaml: parameters (the model built on the meta device: no weights, no memory), peak
device memory broken down, host memory, step and stage time from FLOPs, and scratch space, compared with
slurm/resources.ini (mem, time, gres) and the chosen GPU. Exits 2 naming the stage that does not fit and
the setting to change. An estimate, not a measurement: the model and its assumptions are printed with it.

Memory model (bytes; P parameters, T trainable, C constrained, h hidden, f intermediate, V vocabulary rows,
L layers, n tokens of a micro-batch; "e" is 4 in fp32 and 2 under bf16 autocast):
  weights 4P fp32 master; grads 4T (during backward only the head's, unless grad_accum > 1 keeps them);
  Adam 8T; bf16 autocast keeps a bf16 copy of each matmul weight for backward (2 x matmul weights);
  a constrained arm's parametrization materializes W = softplus(V) each forward (kept for backward);
  activations saved per layer and token (SDPA attention: no s x s matrix; counted with saved-tensor hooks):
    fp32  x, ln1, ln2, q, k, v, attention out and its [B, T, h] copy for the dense layer (8h) + fc1 out,
          gelu out (2f), 4 bytes each
    bf16  x in fp32 (4h) + bf16 ln1, ln2, q, k, v, attention out, its copy (14h) + fc1/gelu out (4f)
  and the final norm's input and output (8h); gradient checkpointing keeps only each layer's input (4h);
  on top of the saved activations, the larger of the loss's backward, per token: log-softmax saved (4V),
  its gradient and the logits' gradient (8V), the bf16 logits' gradient (2V, bf16 only), and one layer's
  backward: its gradients (one layer's worth), with checkpointing also its recomputed activations;
  the update-norm snapshot of logged steps (4T) and, on CUDA, foreach AdamW's temporary (4 x largest group).
Inference (evaluation, attack scoring) keeps one layer's intermediates (8h + 2f, fp32) and the logits.
"""
from __future__ import annotations

import configparser
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import arms
from .cluster import gpu_count, resource_section, slurm_gib, slurm_seconds
from .params import LOCAL_TASK, ParamsError

GIB = 2 ** 30
HOST_BASE_GIB = 3.0         # python + torch + transformers + CUDA runtime in host memory (assumed)
CUDA_RESERVED_GIB = 1.0     # CUDA context, cuBLAS workspace: not available to tensors (assumed)
FRAGMENTATION = 1.10        # caching-allocator slack over the live-tensor peak (assumed)
DOC_TOKENS_ASSUMED = 1000   # mean document length when outputs/data/manifest.json is absent (assumed)
DOCS_ASSUMED = 20000        # document count when data.max_documents is 0 and there is no manifest (assumed)
RESOURCES = Path(__file__).resolve().parent.parent / "slurm" / "resources.ini"


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    bf16_tflops: float      # dense peak
    fp32_tflops: float      # without TF32 (torch's default for matmul)
    source: str = "the vendor's dense peak"


DEVICES = {
    "a100-40gb": Device("A100-SXM4-40GB", 40.0, 312.0, 19.5),
    "a100-80gb": Device("A100-SXM4-80GB", 80.0, 312.0, 19.5),
    "h100-80gb": Device("H100-SXM5-80GB", 79.6, 989.0, 67.0),
    "h200": Device("H200-SXM-141GB", 140.0, 989.0, 67.0),
    "cpu": Device("CPU (host memory = the SLURM mem request)", 0.0, 0.0, 0.17,
                  "the fp32 matmul peak of torch 2.13 on 2 AVX-512 EPYC cores, measured (bench/RESULTS.md)"),
}
MFU_DEFAULT = 0.4           # achieved fraction of the dense peak (assumed; stated in the output)


@dataclass(frozen=True)
class Shape:
    """What the estimates need from the model, read off the meta-device model."""
    params: int
    embedding: int          # input embedding rows x hidden (no FLOPs)
    head: int               # output projection (V x h)
    constrained: int        # weights under softplus for monotonic.variant
    largest_group: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    source: str


@dataclass
class StageEstimate:
    stage: str
    jobs: int                               # how many such jobs dvc.yaml runs
    device_gib: float                       # peak on the device (0 for CPU-only stages)
    host_gib: float
    hours: float
    scratch_gib: float
    parts: dict = field(default_factory=dict)       # breakdown of device_gib, GiB
    note: str = ""
    fix: str = ""                                   # the setting that lowers device_gib
    resumable: bool = False                         # stops on USR1 and requeues (train)
    gpu: bool = True
    dvc: str = ""                                   # dvc.yaml's stage name, if not the first word of `stage`

    @property
    def dvc_stage(self) -> str:
        return self.dvc or self.stage.split(" ")[0]


# --- the model --------------------------------------------------------------------------------------

def fetched_snapshot(params) -> Path | None:
    """The model's snapshot in the hub cache at refs.lock.yaml's commit, if fetch has stored it."""
    from . import hub, refs

    if params.model.source != "hf":
        return None
    try:
        return hub.model_repo(params.model, refs.find(params, "model")["commit"]).snapshot
    except (refs.UnresolvedRef, hub.HubCacheError):
        return None


def model_config(params):
    """The checkpoint's config.json when model.hf_local_path or the fetched snapshot holds one, else a GPT-NeoX
    config with Pythia's layout from the profile's model.* keys and tokenizer.vocab_size (as
    models.tiny_gpt_neox)."""
    from transformers import AutoConfig, GPTNeoXConfig

    m = params.model
    local = Path(m.hf_local_path) if m.hf_local_path else fetched_snapshot(params)
    if local is not None and (local / "config.json").exists():
        return AutoConfig.from_pretrained(str(local), local_files_only=True), f"{local}/config.json"
    config = GPTNeoXConfig(
        vocab_size=params.tokenizer.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings, hidden_act="gelu", use_parallel_residual=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    why = ("model.source scratch" if m.source == "scratch" else
           "no config.json at model.hf_local_path" if m.hf_local_path else "the model is not fetched yet")
    return config, (f"built from model.* and tokenizer.vocab_size={params.tokenizer.vocab_size} with Pythia's "
                    f"layout: rotary 0.25, parallel residual, untied embeddings ({why})")


def meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_shape(params) -> Shape:
    from .monotonic import constrained_modules
    from .training import parameter_groups

    config, source = model_config(params)
    model = meta_model(config)
    constrained = sum(m.weight.numel() for _, m in constrained_modules(model, params.monotonic.variant))
    groups = parameter_groups(model, ())
    largest = max(sum(p.numel() for _, p in members) for members in groups.values())
    return Shape(params=sum(p.numel() for p in model.parameters()),
                 embedding=model.get_input_embeddings().weight.numel(),
                 head=model.get_output_embeddings().weight.numel(), constrained=constrained,
                 largest_group=largest, layers=config.num_hidden_layers, hidden=config.hidden_size,
                 intermediate=config.intermediate_size, heads=config.num_attention_heads,
                 vocab=model.get_output_embeddings().weight.shape[0], source=source)


# --- memory -----------------------------------------------------------------------------------------

def layer_activation_bytes(s: Shape, bf16: bool) -> int:
    """Bytes per token saved for backward by one decoder layer."""
    h, f = s.hidden, s.intermediate
    return 4 * h + 14 * h + 4 * f if bf16 else 4 * (8 * h + 2 * f)


def logits_bytes(s: Shape, bf16: bool) -> int:
    """Bytes per scored token of the head and loss at their peak (forward or backward)."""
    return s.vocab * (4 + 8 + (2 if bf16 else 0))


def train_memory(s: Shape, tokens: int, bf16: bool, checkpointing: bool, grad_accum: int, constrained: bool,
                 cuda: bool) -> dict:
    """Peak device memory of one training step in GiB, by part. The forward/backward peak is the static
    part plus the saved activations plus the larger of the loss's backward (logits) and one layer's backward
    (its gradients; with checkpointing also its recomputed activations); the optimizer-step peak is weights,
    grads, Adam, the update-norm snapshot and the foreach temporary. The peak is the larger of the two."""
    layer = layer_activation_bytes(s, bf16) * tokens
    head_in = 8 * s.hidden * tokens                             # the final norm's input and output, fp32
    saved_full = s.layers * layer + head_in
    saved_ckpt = s.layers * 4 * s.hidden * tokens + head_in     # each layer's input only
    matmul_weights = s.params - s.embedding - (s.constrained if constrained else 0)
    w_bytes = (2 if bf16 else 4) * s.constrained if constrained else 0
    if constrained and checkpointing:
        w_bytes //= s.layers
    parts = {
        "weights": 4 * s.params, "grads": 4 * (s.params if grad_accum > 1 else s.head), "adam": 8 * s.params,
        "bf16_weight_copies": 2 * matmul_weights if bf16 else 0, "materialized_W": w_bytes,
        "activations": saved_ckpt if checkpointing else saved_full,
        "logits_loss": logits_bytes(s, bf16) * tokens,
        "layer_backward": 2 * layer if checkpointing else layer,
    }
    step = {"grads_full": 4 * s.params, "update_norm_snapshot": 4 * s.params,
            "adam_foreach_temp": 4 * s.largest_group if cuda else 0}
    fwd_bwd = sum(parts.values()) - min(parts["logits_loss"], parts["layer_backward"])
    opt = parts["weights"] + parts["adam"] + sum(step.values())
    out = {k: v / GIB for k, v in parts.items()}
    out.update({"activations_without_checkpointing": saved_full / GIB,
                "activations_with_checkpointing": saved_ckpt / GIB,
                **{k: v / GIB for k, v in step.items()}, "peak_forward_backward": fwd_bwd / GIB,
                "peak_optimizer_step": opt / GIB, "peak": max(fwd_bwd, opt) / GIB})
    return out


def inference_bytes(s: Shape, batch: int, seq: int, scored: int) -> int:
    """Transient bytes of a no-grad forward: one layer's intermediates, the residual, the scored logits."""
    h, f = s.hidden, s.intermediate
    return batch * seq * 4 * (8 * h + 2 * f) + batch * scored * 8 * s.vocab + batch * seq * seq


def input_grad_bytes(s: Shape, batch: int, seq: int, scored: int, positions: int) -> int:
    """An attack's gradient pass (fp32, weights frozen): activations of every layer, the loss, and the
    first-order scores [batch, positions, V]."""
    layer = layer_activation_bytes(s, False) * batch * seq
    return (s.layers + 1) * layer + logits_bytes(s, False) * batch * scored + 8 * batch * positions * s.vocab


# --- FLOPs ------------------------------------------------------------------------------------------

def forward_flops(s: Shape, seq: int, scored: int) -> float:
    """One sequence's forward: 2 x matmul weights per token (head only at scored positions) + attention."""
    body = s.params - s.embedding - s.head
    return 2 * body * seq + 2 * s.head * scored + 4 * s.layers * seq * seq * s.hidden


def hours(flops: float, tflops: float, mfu: float) -> float:
    return flops / (tflops * 1e12 * mfu) / 3600 if tflops else 0.0


# --- data sizes -------------------------------------------------------------------------------------

def split_tokens(params, split: str) -> tuple[int, int, str]:
    """(documents, tokens) of a split: from outputs/data/manifest.json if present, else assumed."""
    manifest = Path("outputs/data/manifest.json")
    if manifest.exists():
        row = json.loads(manifest.read_text())["splits"][split]
        return row["documents"], row["tokens"], "outputs/data/manifest.json"
    docs = params.data.max_documents or DOCS_ASSUMED
    n = int(docs * params.data.fractions[split])
    return n, n * DOC_TOKENS_ASSUMED, f"assumed {DOC_TOKENS_ASSUMED} tokens/document"


def eval_flops(s: Shape, params, split: str, max_documents: int = 0) -> float:
    """document_nll over a split: one window of context_length per stride of scored tokens."""
    docs, tokens, _ = split_tokens(params, split)
    if max_documents:
        tokens = tokens * min(docs, max_documents) // max(docs, 1)
    e = params.eval
    windows = max(1, math.ceil(tokens / e.stride))
    return windows * forward_flops(s, e.context_length, e.stride)


def eval_memory(s: Shape, params) -> int:
    e = params.eval
    return inference_bytes(s, e.batch_size, e.context_length, e.context_length)


# --- stages -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    params: object
    shape: Shape
    device: Device
    device_key: str
    mfu: float

    @property
    def cuda(self) -> bool:
        return self.device_key != "cpu"

    def bf16(self, precision: str) -> bool:
        return self.cuda and precision in ("auto", "bf16")

    def tflops(self, bf16: bool) -> float:
        return self.device.bf16_tflops if bf16 else self.device.fp32_tflops

    @property
    def eval_bf16(self) -> bool:
        """eval.precision as resolved here: every evaluation, attack and transfer forward pass runs in it."""
        return self.bf16(self.params.eval.precision)

    def eval_hours(self, flops: float) -> float:
        return hours(flops, self.tflops(self.eval_bf16), self.mfu)

    def host(self, device_bytes: float, extra: float = 0.0) -> float:
        """Host GiB: the process, plus (on a CPU run) everything that would sit on the device."""
        return HOST_BASE_GIB + extra / GIB + (0 if self.cuda else device_bytes / GIB)


def numerics(bf16: bool) -> str:
    return "bf16 autocast" if bf16 else "fp32"


def _gib(parts: dict) -> dict:
    return {k: round(v / GIB, 3) for k, v in parts.items()}


def data_stage(c: Context) -> StageEstimate:
    p = c.params
    docs = sum(split_tokens(p, s)[0] for s in p.data.fractions)
    tokens = sum(split_tokens(p, s)[1] for s in p.data.fractions)
    width = 2 if p.tokenizer.vocab_size < 2 ** 16 else 4
    text = 4 * tokens                                           # ~4 bytes of text per token
    return StageEstimate("data", 1, 0.0, HOST_BASE_GIB + 3 * text / GIB, tokens / 2e5 / 3600,
                         (width * tokens + text) / GIB, gpu=False,
                         note=f"{docs} documents, {tokens / 1e6:.1f}M tokens; CPU, assumed 200k tokens/s tokenizing")


def pretrain_stage(c: Context) -> StageEstimate:
    p, s = c.params, c.shape
    evaluation = eval_flops(s, p, "validation")
    frontier = len(p.frontier.steps)
    scratch = (1 + frontier) * 4 * s.params / GIB                  # the model and frontier.steps' checkpoints
    if p.model.source == "scratch":
        bf16 = c.bf16(p.train.precision)                            # pretrain takes train.precision
        mem = train_memory(s, p.pretrain.batch_size * p.data.seq_len, bf16, False, 1, False, c.cuda)
        seqs = p.pretrain.steps * p.pretrain.batch_size
        flops = 3 * seqs * forward_flops(s, p.data.seq_len, p.data.seq_len)
        peak = mem["peak"] * GIB
        return StageEstimate("pretrain", 1, peak / GIB, c.host(peak), hours(flops, c.tflops(bf16), c.mfu)
                             + c.eval_hours(evaluation), scratch, parts=_rounded(mem),
                             note=f"{_activations_note(mem)}; trains the scratch model, saving {frontier} checkpoints "
                             "(frontier.steps), then validation NLL",
                             fix=f"lower pretrain.batch_size (now {p.pretrain.batch_size})")
    peak = 4 * s.params + eval_memory(s, p)
    return StageEstimate("pretrain", 1, peak / GIB, c.host(peak, 4 * s.params),
                         c.eval_hours(evaluation) + (1 + frontier) * load_hours(s), scratch,
                         parts=_gib({"weights": 4 * s.params, "evaluation": eval_memory(s, p)}),
                         note=f"loads the checkpoint and saves {frontier} of frontier.steps; validation NLL in "
                         f"{numerics(c.eval_bf16)} (eval.precision)",
                         fix=f"lower eval.batch_size (now {p.eval.batch_size})")


def _rounded(mem: dict) -> dict:
    """The parts of a train_memory estimate; the two activation variants go into the note."""
    return {k: round(v, 3) for k, v in mem.items() if not k.startswith("activations_with")}


def _activations_note(mem: dict) -> str:
    return (f"activations {mem['activations_without_checkpointing']:.2f} GiB without / "
            f"{mem['activations_with_checkpointing']:.2f} GiB with gradient checkpointing")


def monotonic_init_stage(c: Context) -> StageEstimate:
    p, s = c.params, c.shape
    # the pretrained model, the converted one and the equivalent conversion held at once, plus an export
    parts = {"weights": 3 * 4 * s.params, "export_copy": 4 * s.params, "evaluation": eval_memory(s, p)}
    peak = sum(parts.values())
    return StageEstimate("monotonic_init", 1, peak / GIB, c.host(peak, 4 * s.params),
                         c.eval_hours(3 * eval_flops(s, p, "validation")), (4 * s.params + 4 * s.constrained) / GIB,
                         parts=_gib(parts),
                         note=f"softplus init, plain export + V, validation NLL of pretrained, converted and the equivalent "
                         f"conversion in {numerics(c.eval_bf16)} (eval.precision)",
                         fix=f"lower eval.batch_size (now {p.eval.batch_size})")


def train_stage(c: Context, arm: str) -> StageEstimate:
    p, s = c.params, c.shape
    t = p.train_for_arm(arm)
    seq, constrained, bf16 = p.data.seq_len, arms.get(arm).constrained, c.bf16(t.precision)
    mem = train_memory(s, t.batch_size * seq, bf16, t.gradient_checkpointing, t.grad_accum, constrained, c.cuda)
    global_batch = t.batch_size * t.grad_accum
    per_seq = (4 if t.gradient_checkpointing else 3) * forward_flops(s, seq, seq)
    val = (t.max_steps // t.eval_interval + 1) * t.eval_batches * global_batch * forward_flops(s, seq, seq)
    flops = t.max_steps * global_batch * per_seq + val
    state = 12 * s.params                                           # model + Adam states, fp32
    model_out = 4 * s.params + (4 * s.constrained if constrained else 0)
    exports = 2 * len(p.frontier.recovery_steps) * model_out        # steps/step<N>: checkpoint dir and output
    scratch = (t.keep_checkpoints + 1) * state + 2 * model_out + exports    # checkpoints (+1 written), best, final
    peak = mem["peak"] * GIB
    step_s = per_seq * global_batch / (c.tflops(bf16) * 1e12 * c.mfu) if c.tflops(bf16) else 0.0
    return StageEstimate(f"train ({arm})", len(p.seeds), mem["peak"], c.host(peak, state),
                         hours(flops, c.tflops(bf16), c.mfu), scratch / GIB, parts=_rounded(mem), resumable=True,
                         dvc=f"train-{arm}",
                         fix=train_fix(c, t, constrained),
                         note=f"{_activations_note(mem)}; {numerics(bf16)}, micro-batch "
                         f"{t.batch_size}x{seq} tokens, global batch {global_batch}, {t.max_steps} steps of "
                         f"~{step_s:.2f} s"
                         + (", W = softplus(V) materialized each forward" if constrained else ""))


def select_lr_stage(c: Context) -> StageEstimate:
    """Every trained arm's grid, each trial lr_select.steps steps of its training (one job, not resumable: a trial
    is short and restarts whole)."""
    ls = c.params.lr_select
    trials = len(ls.multipliers)
    runs = [(train_stage(c, arm), c.params.train_for_arm(arm).max_steps) for arm in arms.TRAINED_ARMS]
    hours_ = sum(e.hours * trials * ls.steps / steps for e, steps in runs)
    worst = max((e for e, _ in runs), key=lambda e: e.device_gib)
    return StageEstimate("select-lr", 1, worst.device_gib, worst.host_gib, hours_, 0.0, parts=worst.parts, dvc="select-lr",
                         fix=worst.fix, note=f"{trials} trials x {ls.steps} steps for each of {len(runs)} arms, one "
                                        f"after another; memory of the largest ({worst.stage})")


def train_fix(c: Context, t, constrained: bool) -> str:
    """The first change that fits: gradient checkpointing, then also halving the micro-batch (global batch kept)."""
    seq, usable = c.params.data.seq_len, usable_gib(c)
    ckpt = "" if t.gradient_checkpointing else " with train.gradient_checkpointing: true"
    options = [] if t.gradient_checkpointing else [(t.batch_size, t.grad_accum, "train.gradient_checkpointing: true")]
    b, g = t.batch_size, t.grad_accum
    while b > 1:
        b, g = b // 2, g * 2
        options.append((b, g, f"train.batch_size {t.batch_size} -> {b} and train.grad_accum {t.grad_accum} -> "
                              f"{g}{ckpt}"))
    for b, g, text in options:
        need = train_memory(c.shape, b * seq, c.bf16(t.precision), True, g, constrained, c.cuda)["peak"]
        if not c.cuda or need * FRAGMENTATION <= usable:
            return f"set {text} ({need:.1f} GiB)"
    return "use a GPU with more memory (--gpu h200) or shorter data.seq_len"


REF_ARMS = tuple(a.name for a in arms.ARM_TABLE if not a.trained)    # one model serves every seed


def load_hours(s: Shape) -> float:
    """Reading one fp32 model at ~1 GB/s (assumed)."""
    return 4 * s.params / 1e9 / 3600


def attack_work(c: Context, steps: tuple[str, ...]) -> tuple[float, int]:
    """FLOPs of what `assess` does to one model with these attack steps (pipeline/assessment.py: STEPS for an
    arm or frontier checkpoint): test NLL, gradient UAT and HotFlip, with "controls"
    their greedy and random controls, with "targeted" the targeted search and its random control, every method at the hard forward cap that pipeline/attacks.py gives it
    (backward passes for the gradient searches); and their peak transient device bytes."""
    from .attacks import hotflip_forward_cap, uat_forward_cap
    from .params import CONTROLS, TARGETED

    p, s, a = c.params, c.shape, c.params.attack
    u, h = a.uat, a.hotflip
    methods = 1 + (len(CONTROLS) if "controls" in steps else 0)
    seq_u, seq_h, scored = u.trigger_length + a.prompt_tokens + a.continuation_tokens, \
        a.prompt_tokens + a.continuation_tokens, a.continuation_tokens + 1
    fwd_u = methods * (uat_forward_cap(u, a.opt_examples) + a.eval_examples)      # each search, then its trigger
    bwd_u = u.restarts * u.iterations * a.opt_examples
    fwd_h = methods * (hotflip_forward_cap(h, a.eval_examples) + a.eval_examples) + a.eval_examples   # + clean loss
    bwd_h = h.steps * a.eval_examples
    f_u, f_h = forward_flops(s, seq_u, scored), forward_flops(s, seq_h, scored)
    flops = (fwd_u * f_u + bwd_u * (2 * f_u + 2 * u.trigger_length * s.head)
             + fwd_h * f_h + bwd_h * (2 * f_h + 2 * a.prompt_tokens * s.head)
             + eval_flops(s, p, "test", p.eval.max_documents))
    if TARGETED in steps:   # HotFlip's search and its random control on prompt + target, then 4 scorings per example
        t = a.targeted.target_tokens
        f_t = forward_flops(s, a.prompt_tokens + t, t + 1)
        flops += ((2 * hotflip_forward_cap(h, a.eval_examples) + 4 * a.eval_examples) * f_t
                  + bwd_h * (2 * f_t + 2 * a.prompt_tokens * s.head))
    transient = max(eval_memory(s, p), inference_bytes(s, u.batch_size, seq_u, scored),
                    inference_bytes(s, a.batch_size, seq_h, scored),
                    input_grad_bytes(s, u.batch_size, seq_u, scored, u.trigger_length),
                    input_grad_bytes(s, a.batch_size, seq_h, scored, a.prompt_tokens))
    return flops, transient


def scoring_weight_bytes(c: Context) -> int:
    """A frozen model's weights as the scoring stages hold them (device.for_scoring): Linear in bf16 when the
    evaluation runs in bf16, the input embedding in fp32."""
    s = c.shape
    return 2 * (s.params - s.embedding) + 4 * s.embedding if c.eval_bf16 else 4 * s.params


def attack_batch_fit(c: Context) -> dict[str, int] | None:
    """The largest power-of-two batch of each attack's searches whose forward and gradient passes fit beside the
    scoring weights on the device (None on the CPU: host memory bounds it). The cluster profile uses these."""
    if not c.cuda:
        return None
    s, a = c.shape, c.params.attack
    room = usable_gib(c) * GIB / FRAGMENTATION - scoring_weight_bytes(c)
    scored = a.continuation_tokens + 1
    shapes = {"attack.batch_size": (a.prompt_tokens + a.continuation_tokens, a.prompt_tokens),
              "attack.uat.batch_size": (a.uat.trigger_length + a.prompt_tokens + a.continuation_tokens,
                                        a.uat.trigger_length)}
    fit = {}
    for key, (seq, positions) in shapes.items():
        batch = 1
        while batch < 1 << 16 and max(inference_bytes(s, 2 * batch, seq, scored),
                                      input_grad_bytes(s, 2 * batch, seq, scored, positions)) <= room:
            batch *= 2
        fit[key] = batch
    return fit


def assess_stage(c: Context, name: str, models: list[str], what: str) -> StageEstimate:
    """One `assess` job per seed on these models (arms.get names), one after another as pipeline/stages/assess.py
    runs them: each loaded, then attacked with STEPS (arms and frontier checkpoints alike)."""
    from .params import STEPS

    p, s = c.params, c.shape
    work = [attack_work(c, STEPS) for _ in models]
    transient = max((t for _, t in work), default=0)
    weights = scoring_weight_bytes(c) if models else 0
    return StageEstimate(name, len(p.seeds), (weights + transient) / GIB, c.host(weights + transient, weights),
                         sum(c.eval_hours(flops) + load_hours(s) for flops, _ in work), 0.0,
                         parts=_gib({"weights": weights, "largest_batch": transient}),
                         note=f"{what}; {numerics(c.eval_bf16)} (eval.precision)",
                         fix=f"lower attack.batch_size (now {p.attack.batch_size}), attack.uat.batch_size (now "
                             f"{p.attack.uat.batch_size}) or eval.batch_size (now {p.eval.batch_size})")


def assess_stages(c: Context) -> list[StageEstimate]:
    """dvc.yaml's assess jobs: each trained arm with its recovery checkpoints (`assess --arm A --frontier`), each
    reference arm alone (`assess-ref`), and pretraining's checkpoints (`assess-frontier`, `assess --frontier`)."""
    f = c.params.frontier
    arm_work = "test NLL, UAT, HotFlip, controls, targeted"
    rows = []
    for arm in arms.TRAINED_ARMS:
        steps = arms.checkpoints_of(arm, f)
        rows.append(assess_stage(c, f"assess ({arm})", [arm, *steps],
                                 f"{arm}: {arm_work}; its {len(steps)} recovery checkpoints (frontier.recovery_steps "
                                 f"{f.recovery_steps}): the same"))
    rows += [assess_stage(c, f"assess-ref ({arm})", [arm], f"{arm}: {arm_work}") for arm in REF_ARMS]
    steps = arms.checkpoints_of("pretrained", f)
    return rows + [assess_stage(c, "assess-frontier", steps, f"{len(steps)} pretraining checkpoints (frontier.steps "
                                                              f"{f.steps}): {arm_work}")]


def transfer_stage(c: Context) -> StageEstimate:
    p, s, a = c.params, c.shape, c.params.attack
    seq = a.uat.trigger_length + a.prompt_tokens + a.continuation_tokens
    n = len(arms.ARM_NAMES)
    targets = n + len(arms.frontier_checkpoints(p.frontier))
    flops = targets * (1 + 2 * n) * a.eval_examples * forward_flops(s, seq, a.continuation_tokens + 1)
    transient = inference_bytes(s, a.batch_size, seq, a.continuation_tokens + 1)
    peak = 4 * s.params + transient
    return StageEstimate("transfer", len(p.seeds), peak / GIB, c.host(peak, 4 * s.params),
                         c.eval_hours(flops) + targets * load_hours(s), 0.0,
                         parts=_gib({"weights": 4 * s.params, "largest_batch": transient}),
                         note=f"every arm's triggers and flips on every arm and frontier checkpoint ({targets} model "
                              f"loads at ~1 GB/s); {numerics(c.eval_bf16)} (eval.precision)",
                         fix=f"lower attack.batch_size (now {a.batch_size})")


# lm-eval task -> (requests, tokens per request, generous): evaluation-split items x choices; the Pythia paper's
# zero-shot tasks. Any other task: HARNESS_DEFAULT requests of eval.context_length tokens (an upper bound).
HARNESS_TASKS = {"lambada_openai": (5153, 128), "piqa": (2 * 1838, 128), "winogrande": (2 * 1267, 128),
                 "wsc": (2 * 104, 128), "arc_easy": (4 * 2376, 128), "arc_challenge": (4 * 1172, 128),
                 "sciq": (4 * 1000, 256), "logiqa": (4 * 651, 512)}
HARNESS_DEFAULT = 4 * 5000


def benchmark_requests(b, context: int) -> list[tuple[int, int]]:
    """(requests, tokens each) per task of benchmarks.tasks, within benchmarks.limit items."""
    out = []
    for task in b.tasks:
        count, tokens = ((b.local_items, context) if task == LOCAL_TASK
                         else HARNESS_TASKS.get(task, (HARNESS_DEFAULT, context)))
        out.append((min(count, b.limit * 4) if b.limit else count, min(tokens, context)))
    return out


def benchmarks_stage(c: Context, ref: bool) -> StageEstimate:
    """lm-eval on the reference arms (one job) or the trained arms (per seed), one after the other: one fp32
    forward per request, of the task's request length (HARNESS_TASKS)."""
    p, s, b = c.params, c.shape, c.params.benchmarks
    n = len(REF_ARMS if ref else arms.TRAINED_ARMS)
    requests = benchmark_requests(b, p.eval.context_length)
    seq = max(tokens for _, tokens in requests)
    transient = inference_bytes(s, b.batch_size, seq, seq)
    peak = 4 * s.params + transient
    work = n * sum(hours(count * forward_flops(s, tokens, tokens), c.tflops(False), c.mfu) for count, tokens in requests)
    return StageEstimate("benchmarks-ref" if ref else "benchmarks", 1 if ref else len(p.seeds), peak / GIB,
                         c.host(peak, 4 * s.params), work, 0.0,
                         parts=_gib({"weights": 4 * s.params, "largest_batch": transient}),
                         note=f"{n} arms x {sum(k for k, _ in requests)} requests of <= {seq} tokens ({len(b.tasks)} tasks: "
                         "the sizes of HARNESS_TASKS, else 20000 of eval.context_length); fp32",
                         fix=f"lower benchmarks.batch_size (now {b.batch_size})")


def aggregate_stage(c: Context) -> StageEstimate:
    return StageEstimate("aggregate", 1, 0.0, HOST_BASE_GIB, 0.01, 0.0, gpu=False, note="bootstrap statistics; CPU")


def estimates(c: Context) -> list[StageEstimate]:
    return [data_stage(c), pretrain_stage(c), monotonic_init_stage(c), select_lr_stage(c),
            *(train_stage(c, arm) for arm in arms.TRAINED_ARMS), *assess_stages(c), benchmarks_stage(c, True),
            benchmarks_stage(c, False), transfer_stage(c), aggregate_stage(c)]


# --- comparison with slurm/resources.ini and the GPU --------------------------------------------------

def usable_gib(c: Context) -> float:
    return c.device.memory_gib - CUDA_RESERVED_GIB if c.cuda else math.inf


def read_resources(path: Path = RESOURCES) -> configparser.ConfigParser:
    ini = configparser.ConfigParser(interpolation=None)
    if not ini.read(path):
        raise FileNotFoundError(f"cannot read {path}")
    return ini


def problems(c: Context, e: StageEstimate, ini) -> list[str]:
    """Why a stage will not run as requested, each with the setting to change."""
    req = resource_section(ini, e.dvc_stage)
    sect = req.name
    out = []
    if c.cuda and e.gpu:
        if gpu_count(req.get("gres", "")) < 1:
            out.append(f"{e.stage}: needs a GPU, slurm/resources.ini [{sect}] requests none: "
                       "set gres = gpu:<type>:1 (gpu:a100:1)")
        if e.device_gib * FRAGMENTATION > usable_gib(c):
            out.append(f"{e.stage}: needs {e.device_gib:.1f} GiB (x{FRAGMENTATION} allocator slack) on {c.device_key} "
                       f"({c.device.memory_gib:g} GiB, {usable_gib(c):g} usable): {e.fix}")
    mem = slurm_gib(req.get("mem", "0"))
    if e.host_gib > mem:
        out.append(f"{e.stage}: needs {e.host_gib:.1f} GiB of host memory, slurm/resources.ini [{sect}] mem = "
                   f"{req.get('mem')}: raise mem to {math.ceil(e.host_gib * 1.25)}G"
                   + (f" or {e.fix}" if e.fix and not c.cuda else ""))
    limit = slurm_seconds(req.get("time", "0")) / 3600
    if e.hours > limit and not e.resumable:
        out.append(f"{e.stage}: ~{e.hours:.1f} h of compute, slurm/resources.ini [{sect}] time = {req.get('time')}: "
                   f"raise time to {math.ceil(e.hours * 1.5)}:00:00")
    return out


# --- report -----------------------------------------------------------------------------------------

def default_device(params) -> str:
    return "a100-80gb" if params.model.source == "hf" else "cpu"


def table(c: Context, rows: list[StageEstimate], ini) -> str:
    fits_head = f"fits {c.device_key}" if c.cuda else "fits"
    lines = [f"| stage | jobs | device peak GiB / GPUs | host GiB / mem | hours per job / time | scratch GiB, all jobs "
             f"| {fits_head} |",
             "|---|---|---|---|---|---|---|"]
    for e in rows:
        req = resource_section(ini, e.dvc_stage)
        limit = slurm_seconds(req.get("time", "0")) / 3600
        when = f"{e.hours:.2f} / {req.get('time')}"
        if e.resumable and e.hours > limit:
            when += f" (requeues {math.ceil(e.hours / limit) - 1}x)"
        device = (f"{e.device_gib:.2f}" if e.gpu else "CPU") + f" / {gpu_count(req.get('gres', ''))}"
        verdict = "no" if problems(c, e, ini) else "yes"
        lines.append(f"| {e.stage} | {e.jobs} | {device} | {e.host_gib:.1f} / {req.get('mem')} | {when} | "
                     f"{e.scratch_gib * e.jobs:.1f} | {verdict} |")
    return "\n".join(lines)


def breakdown(rows: list[StageEstimate]) -> str:
    """One line per stage: its parts in GiB (MiB for models under 1 GiB) and its note."""
    out = []
    for e in rows:
        unit, scale = ("GiB", 1) if e.device_gib >= 1 else ("MiB", 1024)
        parts = ", ".join(f"{k} {v * scale:.{2 if scale == 1 else 1}f}" for k, v in e.parts.items() if v)
        out.append(f"  {e.stage}: " + (f"{parts} {unit}; " if parts else "") + e.note)
    return "\n".join(out)


def run(params, args) -> int:
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ParamsError("--mfu", args.mfu, "a fraction in (0, 1]")
    key = args.gpu or default_device(params)
    c = Context(params, model_shape(params), DEVICES[key], key, args.mfu or MFU_DEFAULT)
    ini = read_resources(Path(args.resources))
    rows = estimates(c)
    s, d = c.shape, c.device
    print(f"preflight: profile {params.profile}, device {key} ({d.name}"
          + (f", {d.memory_gib:g} GiB, {usable_gib(c):g} usable)" if c.cuda else ")"))
    print(f"model: {s.params:,} parameters ({s.layers} layers, hidden {s.hidden}, intermediate {s.intermediate}, "
          f"{s.heads} heads, vocab {s.vocab}); {s.constrained:,} constrained by {params.monotonic.variant}")
    print(f"config: {s.source}\n")
    print(table(c, rows, ini))
    print("\nbreakdown of the device peak:\n" + breakdown(rows))
    bf16_peak = f"{d.bf16_tflops:g} TFLOP/s bf16, " if d.bf16_tflops else ""
    print(f"\nassumptions: {c.mfu:g} of the dense peak ({bf16_peak}{d.fp32_tflops:g} TFLOP/s fp32: "
          f"{d.source}) is achieved; evaluation, attacks and transfer in {numerics(c.eval_bf16)} (eval.precision "
          f"{params.eval.precision}), benchmarks in fp32, training as its row says (train.precision); fits = peak x "
          f"{FRAGMENTATION} <= memory - {CUDA_RESERVED_GIB:g} GiB; host = {HOST_BASE_GIB:g} GiB process + weights "
          f"loaded or checkpoints written; {split_tokens(params, 'test')[2]}.")
    if c.cuda:
        gpu_hours = sum(e.jobs * e.hours for e in rows if e.gpu)
        print(f"GPU-hours: {gpu_hours:.0f} for the whole DAG ({len(params.seeds)} seeds; jobs x hours per job of "
              "every GPU stage)")
    fit = attack_batch_fit(c)
    if fit:
        a = params.attack
        now = {"attack.batch_size": a.batch_size, "attack.uat.batch_size": a.uat.batch_size}
        print("attack batches: the largest that fit on this GPU (powers of two): "
              + ", ".join(f"{k} {v} (now {now[k]})" for k, v in fit.items()))
    found = [p for e in rows for p in problems(c, e, ini)]
    for line in found:
        print(f"error: {line}")
    return 2 if found else 0
