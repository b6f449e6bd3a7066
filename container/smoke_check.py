"""The image's %test: a tiny GPT-NeoX forward pass (on the GPU when one is visible) and the softplus
constraint applied and verified, with the project's own code; plus, when the image carries the model,
a check that the baked checkpoint is the pinned revision. Runs in seconds; prints one line per check."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from pipeline.monotonic import apply_monotonic, verify


def tiny_forward_and_verify() -> None:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPTNeoXForCausalLM(config).to(device).eval()
    report = apply_monotonic(model, "mlp_both", "abs", 1e-4)
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 64, (2, 16), device=device)).logits
    assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all(), "tiny forward pass failed"
    verify(model, "mlp_both")
    print(f"ok: tiny GPT-NeoX forward on {device} (torch {torch.__version__}); "
          f"{report['modules_constrained']} constrained modules, min weight {report['min_weight']:.2e}")


def baked_model(local_path: str, revision: str) -> None:
    path = Path(local_path)
    resolved = path.resolve()
    assert resolved.name == revision, f"{path} resolves to {resolved}, not the pinned revision {revision}"
    for name in ("config.json", "tokenizer.json"):
        assert (path / name).is_file(), f"{path / name} missing"
    assert list(path.glob("*.safetensors")), f"no safetensors weights in {path}"
    print(f"ok: {path} is revision {revision}")


if __name__ == "__main__":
    tiny_forward_and_verify()
    if os.environ.get("MODEL_BAKED") == "1":
        baked_model(os.environ["MODEL_LOCAL_PATH"], os.environ["MODEL_REVISION"])
    else:
        print("weightless image: no baked model to check")
