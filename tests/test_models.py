"""Model loading and the decoder-layer resolver, on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fsteer_export.errors import FSteerError
from fsteer_export.models import (SUPPORTED_ARCHITECTURES, check_layer, decoder_layers, hidden_size, load_model,
                                  model_type, num_layers)
from fsteer_export.testing import ARCHITECTURES, tiny_config, tiny_model

EXPECTED_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                  "gemma3": "gemma3_text", "phi3": "phi3", "gpt2": "gpt2"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_resolver_finds_every_decoder_layer(arch):
    model = tiny_model(arch)
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == num_layers(model) == 4
    assert model_type(model) == EXPECTED_TYPES[arch]
    assert model_type(model) in SUPPORTED_ARCHITECTURES
    assert hidden_size(model) == 32
    # The resolved list is the one the forward pass runs: a hook on each layer fires once per call.
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    for h in handles:
        h.remove()
    assert calls == [0, 1, 2, 3]


def test_unknown_architecture_is_a_clear_error():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("opt", vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                               num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(FSteerError) as info:
        decoder_layers(model)
    msg = info.value.line()
    assert "unsupported architecture 'opt'" in msg and "fix:" in msg and "llama" in msg


def test_bare_backbone_is_a_clear_error():
    from transformers import AutoModel

    backbone = AutoModel.from_config(tiny_config("llama"))  # LlamaModel: no .model.layers path
    with pytest.raises(FSteerError, match="has no 'model.layers'"):
        decoder_layers(backbone)


@pytest.mark.parametrize("layer", [-1, 4, 99])
def test_layer_out_of_range(layer):
    with pytest.raises(FSteerError) as info:
        check_layer(tiny_model("llama"), layer)
    assert f"--layer {layer} is out of range for this model (4 decoder layers)" in info.value.line()
    assert "use a value from 0 to 3" in info.value.line()


def test_unknown_model_alias():
    with pytest.raises(FSteerError) as info:
        load_model("smollm3-135m-instruct")
    assert "unknown model 'smollm3-135m-instruct'" in info.value.line()
    assert "smollm2-135m-instruct" in info.value.fix


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(FSteerError, match="not a transformers model folder"):
        load_model(str(tmp_path))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FSteerError, match="does not exist"):
        load_model(str(tmp_path / "nothing.gguf"))


def test_unknown_dtype(tiny_folder):
    with pytest.raises(FSteerError, match="unknown --dtype 'float8'"):
        load_model(str(tiny_folder), dtype="float8")


def test_load_model_left_pads_and_evals(tiny_folder):
    lm = load_model(str(tiny_folder))
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None
    assert not lm.model.training
    assert model_type(lm.model) == "llama"


def test_trust_remote_code_is_off_by_default(tiny_folder, monkeypatch):
    import transformers

    seen = []
    real_tok, real_model = transformers.AutoTokenizer.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained

    def spy(real):
        def call(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "absent"))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy(real_tok))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy(real_model))
    load_model(str(tiny_folder))
    assert seen == [False, False]
    seen.clear()
    load_model(str(tiny_folder), trust_remote_code=True)
    assert seen == [True, True]


def test_cli_passes_trust_remote_code_only_when_asked(tiny_folder, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import fsteer_export.models as models
    from fsteer_cli.main import app

    seen = []

    def fake_load(name, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise FSteerError("stop here")

    monkeypatch.setattr(models, "load_model", fake_load)
    runner = CliRunner()
    base = ["generate", "--model", str(tiny_folder), "--prompt", "hi"]
    assert runner.invoke(app, base).exit_code == 2
    assert runner.invoke(app, base + ["--trust-remote-code"]).exit_code == 2
    out = tmp_path / "out"
    assert runner.invoke(app, ["train", "--model", str(tiny_folder), "--data", "demo:harmful", "--out", str(out)]).exit_code == 2
    assert seen == [False, True, False]
    assert not out.exists()
