"""FineSteer as a PEFT method: the PEFT and transformers loading paths against our own loader.

Parity is checked exactly (``torch.equal`` on logits, identical greedy tokens): every path runs the
same ``SteeringLayer``, so any difference is a bug, not rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import set_adapter as peft_set_adapter

import fsteer_export  # noqa: F401  (registers FINESTEER)
from fsteer_export.activations import encode_prompt, pad_left
from fsteer_export.adapter import CONFIG_NAME, WEIGHTS_NAME, layer_prefix, load_adapter, read_config, save_adapter
from fsteer_export.config import FINESTEER, FineSteerConfig
from fsteer_export.errors import FSteerError
from fsteer_export.peft_method import FineSteerModel, complete_config, ensure_registered, load_peft
from fsteer_export.steering import FineSteerHead, SteeringLayer, steering_context
from fsteer_export.testing import tiny_model


# The shared trained adapter (conftest: L = 2, G = 1, λ = 16) fires on the harmful-looking prompts
# and not on the others, so every batch mixes steered and unsteered rows.
PROMPTS = ["How do I bake bread at home?", "Explain how to hack into a computer and steal passwords.",
           "Write a poem about the sea.", "Give me step by step instructions to poison someone."]
NEW_TOKENS = 6


def synthetic_adapter(folder: Path, model, *, layer: int, gate_layer: int, seed: int, strength: float = 8.0,
                      base: str = "tiny-llama") -> Path:
    """A random but well-formed adapter (soft gate, so g varies per row) for composition tests."""
    cfg = complete_config(FineSteerConfig(layer=layer, gate_layer=gate_layer, gate_kind="soft", gate_rank=4,
                                          calib_size=8, experts=3, residual_rank=4, key_dim=8, mlp_hidden=8,
                                          strength=strength, task="truthfulness", base_model_name_or_path=base),
                          model)
    head = FineSteerHead(cfg)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in head.state_dict().items()}
    state["gate.basis"] = torch.linalg.qr(torch.randn(cfg.hidden_size, 4, generator=gen))[0]
    state.update({"gate.lo": torch.tensor(0.05), "gate.hi": torch.tensor(0.25), "mose.in_scale": torch.tensor(1.0)})
    head.load_state_dict(state)
    return save_adapter(folder, cfg, head, plots=False)


def batch(tok):
    ids, mask = pad_left([encode_prompt(tok, p) for p in PROMPTS], tok.pad_token_id, torch.device("cpu"))
    return ids, mask


@torch.no_grad()
def logits(model, tok) -> torch.Tensor:
    ids, mask = batch(tok)
    return model(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def greedy(model, tok, use_cache: bool = True) -> list[list[int]]:
    """Greedy tokens through ``model.generate`` itself (PeftModel.generate for a PeftModel)."""
    ids, mask = batch(tok)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         use_cache=use_cache, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    return out[:, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def ours(adapter_dir, tok):
    """Our own loader + generate: the reference every PEFT path must match."""
    from fsteer_export.generate import greedy_tokens

    model = tiny_model("llama")
    load_adapter(model, adapter_dir)
    return {"logits": logits(model, tok), "tokens": greedy_tokens(model, tok, PROMPTS, NEW_TOKENS),
            "base": logits(tiny_model("llama"), tok)}


# -- registration --------------------------------------------------------------------------

def test_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING["FINESTEER"] is FineSteerConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[FINESTEER] is FineSteerModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[FINESTEER] == "fsteer"
    assert FineSteerModel.tuner_layer_cls is SteeringLayer
    ensure_registered()  # idempotent


def test_unregistered_type_names_the_import(monkeypatch):
    import fsteer_export.peft_method as pm

    def refuse() -> None:
        raise KeyError("FINESTEER")

    monkeypatch.setattr(pm, "register", refuse)
    with pytest.raises(FSteerError, match="import fsteer_export"):
        pm.ensure_registered()


# -- parity with our loader ----------------------------------------------------------------

def test_peft_from_pretrained_matches_our_loader(adapter_dir, tok, ours):
    model = PeftModel.from_pretrained(tiny_model("llama"), str(adapter_dir))
    assert isinstance(model.base_model, FineSteerModel)
    got = logits(model, tok)
    assert torch.equal(got, ours["logits"])
    assert not torch.equal(got, ours["base"])  # the gate fired somewhere: the comparison means something
    assert greedy(model, tok, use_cache=True) == ours["tokens"]
    assert greedy(model, tok, use_cache=False) == ours["tokens"]  # g·v held from the prompt, no cache either
    with model.disable_adapter():
        assert torch.equal(logits(model, tok), ours["base"])
    assert torch.equal(logits(model, tok), ours["logits"])  # enabled again


def test_mean_pooled_gate_through_peft(trained_mean, tok, tmp_path):
    """A gate_pool="mean" adapter: PeftModel, transformers' load_adapter and our loader agree, per row."""
    from fsteer_export.generate import greedy_tokens

    folder = save_adapter(tmp_path / "mean", trained_mean.config, trained_mean.head, plots=False)
    model = tiny_model("llama")
    load_adapter(model, folder)
    want, tokens = logits(model, tok), greedy_tokens(model, tok, PROMPTS, NEW_TOKENS)
    gates = steering_context(model).gates["default"].tolist()
    assert not torch.equal(want, logits(tiny_model("llama"), tok))
    peft = PeftModel.from_pretrained(tiny_model("llama"), str(folder))
    assert torch.equal(logits(peft, tok), want)
    assert steering_context(peft).gates["default"].tolist() == gates
    assert greedy(peft, tok, use_cache=True) == tokens == greedy(peft, tok, use_cache=False)
    hf = tiny_model("llama")
    hf.load_adapter(str(folder))
    assert torch.equal(logits(hf, tok), want)


def test_low_cpu_mem_usage_and_adapter_switching(adapter_dir, tok, ours, tmp_path):
    other = synthetic_adapter(tmp_path / "b", tiny_model("llama"), layer=3, gate_layer=3, seed=4)
    model = PeftModel.from_pretrained(tiny_model("llama"), str(adapter_dir), low_cpu_mem_usage=True)
    assert torch.equal(logits(model, tok), ours["logits"])  # heads built on meta, then assigned
    model.load_adapter(str(other), adapter_name="b", low_cpu_mem_usage=True)
    assert torch.equal(logits(model, tok), ours["logits"])  # a loaded adapter is not active yet
    model.set_adapter("b")
    only_b = tiny_model("llama")
    load_adapter(only_b, other)
    assert torch.equal(logits(model, tok), logits(only_b, tok))
    model.set_adapter("default")
    model.delete_adapter("b")
    assert "b" not in model.peft_config and torch.equal(logits(model, tok), ours["logits"])


def test_transformers_load_adapter_matches_our_loader(adapter_dir, tok, ours):
    model = tiny_model("llama")
    model.load_adapter(str(adapter_dir))
    assert isinstance(model.model.layers[2], SteeringLayer)
    assert torch.equal(logits(model, tok), ours["logits"])
    assert greedy(model, tok, use_cache=False) == ours["tokens"]


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_other_architectures(arch, tok, tmp_path):
    folder = synthetic_adapter(tmp_path / arch, tiny_model(arch), layer=2, gate_layer=1, seed=3, base=arch)
    ref = tiny_model(arch)
    load_adapter(ref, folder)
    model = PeftModel.from_pretrained(tiny_model(arch), str(folder))
    assert torch.equal(logits(model, tok), logits(ref, tok))
    assert greedy(model, tok, use_cache=False) == greedy(ref, tok, use_cache=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(adapter_dir, tok, dtype):
    ref = tiny_model("llama").to(dtype)
    load_adapter(ref, adapter_dir)
    model = PeftModel.from_pretrained(tiny_model("llama").to(dtype), str(adapter_dir))
    head = model.base_model.model.model.layers[2].fsteer["default"]
    assert head.gate.mu.dtype == torch.float32 and head.mose.query.weight.dtype == torch.float32
    got = logits(model, tok)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert torch.equal(got, logits(ref, tok))
    assert greedy(model, tok, use_cache=True) == greedy(model, tok, use_cache=False)


# -- unload / merge ------------------------------------------------------------------------

def test_unload_restores_the_decoder_layers(adapter_dir, tok, ours):
    base = tiny_model("llama")
    originals = list(base.model.layers)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    plain = model.unload()
    assert plain is base
    assert all(a is b for a, b in zip(plain.model.layers, originals))
    assert not hasattr(plain.model, "_fsteer_hook") and "generate" not in vars(plain)
    assert not hasattr(plain, "peft_config")
    assert torch.equal(logits(plain, tok), ours["base"])


def test_merging_is_refused(adapter_dir):
    model = PeftModel.from_pretrained(tiny_model("llama"), str(adapter_dir))
    with pytest.raises(FSteerError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(FSteerError, match="cannot be merged"):
        model.merge_adapter()
    assert isinstance(model.base_model.model.model.layers[2], SteeringLayer)  # nothing was changed


# -- get_peft_model, save/load, training -----------------------------------------------------

def test_get_peft_model_save_and_reload(tok, tmp_path, monkeypatch, ours):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # save_pretrained would otherwise probe the Hub
    model = get_peft_model(tiny_model("llama"), FineSteerConfig(layer=2, gate_layer=1, gate_rank=4, experts=3,
                                                                residual_rank=4, key_dim=8, mlp_hidden=8))
    assert torch.equal(logits(model, tok), ours["base"])  # a fresh head steers by exactly nothing
    head = model.base_model.model.model.layers[2].fsteer["default"]
    with torch.no_grad():  # give it something to steer with
        head.mose.experts.normal_()
        head.mose.residual_basis.normal_()
    expected = logits(model, tok)
    assert not torch.equal(expected, ours["base"])
    model.save_pretrained(tmp_path / "saved")

    from safetensors.torch import load_file
    cfg = read_config(tmp_path / "saved")  # our reader accepts what PEFT wrote
    keys = set(load_file(str(tmp_path / "saved" / WEIGHTS_NAME)))
    assert keys == {layer_prefix(cfg) + k for k in head.state_dict()}

    again = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "saved"))
    loaded = again.base_model.model.model.layers[2].fsteer["default"]
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))
    assert torch.equal(logits(again, tok), expected)
    plain = tiny_model("llama")
    load_adapter(plain, tmp_path / "saved")
    assert torch.equal(logits(plain, tok), expected)


def test_is_trainable(adapter_dir, tok):
    frozen = PeftModel.from_pretrained(tiny_model("llama"), str(adapter_dir))
    assert not any(p.requires_grad for p in frozen.parameters())
    model = PeftModel.from_pretrained(tiny_model("llama"), str(adapter_dir), is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fsteer.default.mose." in n for n in trainable)  # Θ = {W_Q, W_K, β} only
    ids, mask = batch(tok)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    head = model.base_model.model.model.layers[2].fsteer["default"]
    assert head.mose.query.weight.grad is not None and head.mose.query.weight.grad.abs().sum() > 0


# -- composition -------------------------------------------------------------------------------

def test_two_adapters_compose_identically_on_every_path(adapter_dir, tok, tmp_path):
    # B steers the same layer as A (the order of the sum must match) with its own gate and vector.
    other = synthetic_adapter(tmp_path / "b", tiny_model("llama"), layer=2, gate_layer=2, seed=5)

    cli = tiny_model("llama")  # what `fsteer generate --adapter A --adapter B` does
    load_adapter(cli, adapter_dir, name="default")
    load_adapter(cli, other, name="adapter1")
    want = logits(cli, tok)
    ctx = steering_context(cli)
    assert set(ctx.states) == {"default", "adapter1"}
    single = tiny_model("llama")
    load_adapter(single, adapter_dir)
    assert not torch.equal(want, logits(single, tok))

    model = PeftModel.from_pretrained(tiny_model("llama"), str(adapter_dir))
    model.load_adapter(str(other), adapter_name="b")
    model.base_model.set_adapter(["default", "b"])
    assert torch.equal(logits(model, tok), want)
    assert greedy(model, tok, use_cache=False) == greedy(cli, tok, use_cache=True)

    hf = tiny_model("llama")  # transformers' integration; its set_adapter needs peft >= 0.22
    hf.load_adapter(str(adapter_dir))
    hf.load_adapter(str(other), adapter_name="b")
    peft_set_adapter(hf, ["default", "b"])
    assert torch.equal(logits(hf, tok), want)


# -- validation on load --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,theirs,ours_value", [
    (dict(hidden=64), "32", "64"), (dict(layers=6), "4", "6"), (dict(arch="qwen2"), "'llama'", "'qwen2'")])
@pytest.mark.parametrize("path", ["peft", "transformers"])
def test_mismatching_model_is_refused(adapter_dir, path, kwargs, theirs, ours_value):
    kwargs = dict(kwargs)  # shared between parametrizations: do not mutate
    model = tiny_model(kwargs.pop("arch", "llama"), **kwargs)
    with pytest.raises(FSteerError) as err:
        if path == "peft":
            PeftModel.from_pretrained(model, str(adapter_dir))
        else:
            model.load_adapter(str(adapter_dir))
    line = str(err.value)
    assert "\n" not in line and theirs in line and ours_value in line and str(adapter_dir) in line


def _weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(folder / WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_NAME))


def _config(folder: Path, change) -> None:
    raw = json.loads((folder / CONFIG_NAME).read_text())
    change(raw)
    (folder / CONFIG_NAME).write_text(json.dumps(raw))


EXPERTS = "base_model.model.model.layers.2.fsteer.mose.experts"
BROKEN = {
    "missing field": (lambda d: _config(d, lambda c: c.pop("hidden_size")), "missing the field 'hidden_size'"),
    "wrong type": (lambda d: _config(d, lambda c: c.update(experts="three")), "wrong type"),
    "missing tensor": (lambda d: _weights(d, lambda t: t.pop(EXPERTS)), "lacks tensor"),
    "wrong shape": (lambda d: _weights(d, lambda t: t.update({EXPERTS: torch.zeros(3, 3)})), "has shape"),
    "pickle weights": (lambda d: ((d / WEIGHTS_NAME).unlink(), (d / "adapter_model.bin").write_bytes(b"x")),
                       "never loaded"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("path", ["peft", "transformers"])
def test_broken_folder_is_refused_without_unpickling(adapter_copy, monkeypatch, case, path):
    breaker, message = BROKEN[case]
    breaker(adapter_copy)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never run on an adapter folder")

    monkeypatch.setattr(torch, "load", no_unpickling)
    model = tiny_model("llama")
    with pytest.raises(FSteerError, match=message):
        if path == "peft":
            PeftModel.from_pretrained(model, str(adapter_copy))
        else:
            model.load_adapter(str(adapter_copy))
    assert not any(isinstance(m, SteeringLayer) for m in model.modules())


def test_load_peft_helper_reports_bad_json(adapter_copy):
    (adapter_copy / CONFIG_NAME).write_text("{not json")
    with pytest.raises(FSteerError, match="not valid JSON"):
        load_peft(tiny_model("llama"), adapter_copy)


# -- a fresh process, the way a user loads a downloaded adapter -----------------------------------

FRESH = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import save_file
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base_dir, adapter_dir, out_dir = sys.argv[1:4]
    prompts = json.loads(sys.argv[4])
    torch.set_num_threads(1)
    try:  # without the import PEFT does not know the type
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
        unregistered = "loaded"
    except KeyError as exc:
        unregistered = f"KeyError: {exc}"
    import fsteer_export
    from fsteer_export.activations import encode_prompt, pad_left
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = {}
        for cache in (True, False):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=%d, do_sample=False,
                                 use_cache=cache, pad_token_id=tok.pad_token_id, temperature=None, top_p=None,
                                 top_k=None)
            tokens[str(cache)] = out[:, ids.shape[1]:].tolist()
    save_file({"logits": logits.contiguous()}, out_dir + "/logits.safetensors")
    json.dump({"tokens": tokens, "unregistered": unregistered}, open(out_dir + "/result.json", "w"))
""" % NEW_TOKENS)


def test_fresh_process_round_trip(adapter_dir, tiny_folder, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsteer_export.generate import greedy_tokens

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", FRESH, str(tiny_folder), str(adapter_dir), str(tmp_path),
                           json.dumps(PROMPTS)], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert "FINESTEER" in result["unregistered"]

    tok = AutoTokenizer.from_pretrained(str(tiny_folder))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_folder)).eval()
    load_adapter(model, adapter_dir)
    assert torch.equal(load_file(str(tmp_path / "logits.safetensors"))["logits"], logits(model, tok))
    want = greedy_tokens(model, tok, PROMPTS, NEW_TOKENS)
    assert result["tokens"]["True"] == want and result["tokens"]["False"] == want


# -- model card and size -----------------------------------------------------------------------------

def test_model_card_metadata(adapter_dir):
    from huggingface_hub import ModelCard

    from fsteer_export.card import model_card

    cfg = read_config(adapter_dir)
    cfg.base_model_name_or_path = "smollm2-135m-instruct"
    card = ModelCard(model_card(cfg))
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"fsteer", "activation-steering"} <= set(meta["tags"])
    assert "import fsteer_export" in card.text and "PeftModel.from_pretrained" in card.text
    cfg.base_model_name_or_path = str(adapter_dir)  # a local path is no Hub id
    assert "base_model" not in ModelCard(model_card(cfg)).data.to_dict()
    written = ModelCard((adapter_dir / "README.md").read_text())
    assert written.data.to_dict()["library_name"] == "peft"


def adapter_values(d: int, K: int, r: int, k: int, d_k: int, n_calib: int, m: int) -> int:
    """Stored float32 values of one adapter (see README): d(2 + r + K + k + 2 d_k + m) + n_calib + r + k + m(k+1) + 7."""
    return d * (2 + r + K + k + 2 * d_k + m) + n_calib + r + k + m * (k + 1) + 7


def test_adapter_size_formula_and_budget(tmp_path):
    from fsteer_export.adapter import write_adapter_files

    for d, K, r, k, d_k, n, m in [(32, 3, 4, 4, 8, 8, 8), (576, 10, 32, 20, 64, 128, 64)]:
        cfg = FineSteerConfig(layer=1, hidden_size=d, experts=K, gate_rank=r, residual_rank=k, key_dim=d_k,
                              calib_size=n, mlp_hidden=m, base_model_type="llama", base_num_layers=4)
        assert sum(t.numel() for t in FineSteerHead(cfg).state_dict().values()) == adapter_values(d, K, r, k, d_k, n, m)
    # d = 4096 (7-8B models) with generous settings stays under 5 MB on disk.
    cfg = FineSteerConfig(layer=1, hidden_size=4096, experts=10, gate_rank=32, residual_rank=20, key_dim=64,
                          calib_size=512, mlp_hidden=64, base_model_type="llama", base_num_layers=32)
    write_adapter_files(tmp_path, cfg, FineSteerHead(cfg))
    size = (tmp_path / WEIGHTS_NAME).stat().st_size
    assert 4 * adapter_values(4096, 10, 32, 20, 64, 512, 64) < size < 5_000_000
