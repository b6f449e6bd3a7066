import json


def test_smoke_workspace_stages_produce_outputs(smoke_workspace):
    manifest = json.loads((smoke_workspace / "outputs/data/manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 0
    pre = json.loads((smoke_workspace / "outputs/metrics/pretrain.json").read_text())
    assert pre["validation_perplexity"] < pre["unigram_validation_perplexity"]
    assert (smoke_workspace / "outputs/models/monotonic_init/monotonic_state.safetensors").exists()
