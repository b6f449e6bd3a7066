"""Model construction, plain HF save/load (safetensors only, offline, no remote code)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .params import ModelParams

META_FILE = "pipeline_meta.json"
MONOTONIC_SPEC_FILE = "monotonic.json"


def tiny_gpt_neox(p: ModelParams, tokenizer, vocab_rows: int | None = None):
    """The embedded stand-in for Pythia: a GPT-NeoX built from a small config (Pythia's layout:
    parallel residual, partial rotary embeddings, untied output head), with `vocab_rows` embedding rows
    (default: one per tokenizer entry; Pythia pads them to a multiple of 128)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab_rows or len(tokenizer), hidden_size=p.hidden_size, num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads, intermediate_size=p.intermediate_size,
        max_position_embeddings=p.max_position_embeddings, hidden_act="gelu",
        use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPTNeoXForCausalLM(config)


def _refuse_parametrized(path: Path) -> None:
    from safetensors import safe_open

    for weights in sorted(path.glob("model*.safetensors")):   # model.safetensors or its shards
        with safe_open(weights, "pt") as fh:
            bad = [k for k in fh.keys() if ".parametrizations." in k]
        if bad:
            raise ValueError(f"{weights} holds softplus-parametrized keys ({bad[0]}, ...): a plain model would "
                             "silently re-initialise them. Load it with pipeline.monotonic.load_parametrized.")


def load_causal_lm(path: str | Path, dtype=torch.float32):
    """Load a plain HF causal LM from a local directory; any missing or unexpected key is an error."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    _refuse_parametrized(path)
    model, info = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype,
                                                       output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                                       "mismatched_keys")}
    if problems:
        raise ValueError(f"loading {path}: {problems}")
    return model


def save_causal_lm(model, tokenizer, path: str | Path, meta: dict) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / META_FILE).read_text())


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
