"""Adapter folders that are wrong, broken or hostile: each is one clear FSteerError, raised before
anything is attached to the model, and pickle files are never unpickled."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save

from fsteer_export.adapter import (CONFIG_NAME, WEIGHTS_NAME, adapter_summary, atomic_folder, load_adapter,
                                   read_config, read_weights)
from fsteer_export.errors import FSteerError
from fsteer_export.steering import SteeringLayer, decoder_layers
from fsteer_export.testing import tiny_model


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Every test here fails if anything calls torch.load (or pickle.load)."""
    import pickle

    def refuse(*a, **k):
        raise AssertionError("torch.load / pickle.load must never be called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def load_error(folder, model=None) -> str:
    """Load ``folder`` onto a fresh tiny Llama; return the error line; check nothing was attached."""
    model = model or tiny_model("llama")
    with pytest.raises(FSteerError) as info:
        load_adapter(model, folder)
    assert not any(isinstance(m, SteeringLayer) for m in decoder_layers(model)), "half-attached adapter"
    line = info.value.line()
    assert " — fix: " in line and "\n" not in line
    return line


def edit_config(folder: Path, **changes):
    path = folder / CONFIG_NAME
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is DELETE:
            del cfg[k]
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


DELETE = object()


def edit_weights(folder: Path, fn, keep_metadata=False):
    path = folder / WEIGHTS_NAME
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.endswith(".mose.experts"))
    fn(tensors, key)
    st_save(tensors, str(path), metadata=read_metadata(path) if keep_metadata else {"format": "pt"})


def read_metadata(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]).get("__metadata__", {})


def test_clean_adapter_loads(adapter_copy):
    head = load_adapter(tiny_model("llama"), adapter_copy)
    assert head.strength == 16.0
    assert "fsteer_sha256" in read_metadata(adapter_copy / WEIGHTS_NAME)


# -- adapter for another model ------------------------------------------------------------------------

@pytest.mark.parametrize("model_kw,fragment", [
    (dict(arch="llama", hidden=64), "hidden size 32, but this model has 64"),
    (dict(arch="llama", layers=6), "number of layers 4, but this model has 6"),
    (dict(arch="mistral"), "model_type 'llama', but this model has 'mistral'"),
    (dict(arch="gpt2"), "model_type 'llama', but this model has 'gpt2'"),
])
def test_adapter_for_another_model(adapter_copy, model_kw, fragment):
    line = load_error(adapter_copy, tiny_model(**model_kw))
    assert f"adapter {adapter_copy} was trained for a model with {fragment}" in line
    assert "load it onto its base model (tiny-llama)" in line


# -- adapter_config.json ---------------------------------------------------------------------------------

def test_missing_folder_and_config(tmp_path, adapter_copy):
    assert "adapter folder" in load_error(tmp_path / "nope") and "does not exist" in load_error(tmp_path / "nope")
    (adapter_copy / CONFIG_NAME).unlink()
    assert f"has no {CONFIG_NAME}: it is not an adapter folder" in load_error(adapter_copy)


def test_truncated_config(adapter_copy):
    path = adapter_copy / CONFIG_NAME
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    assert re.search(r"adapter_config\.json is not valid JSON \(.+\)", load_error(adapter_copy))


def test_empty_and_binary_config(adapter_copy):
    path = adapter_copy / CONFIG_NAME
    path.write_text("")
    assert "is not valid JSON" in load_error(adapter_copy)
    path.write_bytes(b"\xff\xfe{\x00}\x00")
    assert "is not valid JSON" in load_error(adapter_copy)
    path.write_text("[1, 2]")
    assert "does not hold a JSON object" in load_error(adapter_copy)


@pytest.mark.parametrize("changes,fragment", [
    (dict(layer=DELETE), "is missing the field 'layer'"),
    (dict(hidden_size=DELETE), "is missing the field 'hidden_size'"),
    (dict(layer="2"), "field 'layer' has the wrong type (str: '2')"),
    (dict(experts=2.0), "field 'experts' has the wrong type (float: 2.0)"),
    (dict(gate_kind=3), "field 'gate_kind' has the wrong type (int: 3)"),
    (dict(strength=True), "field 'strength' has the wrong type (bool: True)"),
    (dict(training="none"), "field 'training' has the wrong type (str: 'none')"),
    (dict(gate_rank=0), "field 'gate_rank' is out of range (0)"),
    (dict(strength=float("nan")), "field 'strength' is not finite"),
    (dict(strength=10 ** 400), "field 'strength' is not finite"),
    (dict(strength=float("-inf")), "field 'strength' is not finite"),
    (dict(peft_type="LORA"), "has peft_type 'LORA', not 'FINESTEER'"),
    (dict(peft_type=DELETE), "has peft_type None, not 'FINESTEER'"),
    (dict(format_version=2), "has format_version 2; this fsteer_export reads 1"),
    (dict(layer=9), "adapter layer 9 is out of range for this model (4 decoder layers)"),
    (dict(gate_layer=3), "gate layer 3 is after steering layer 2"),
    (dict(gate_kind="banana"), "unknown gate kind 'banana'"),
    (dict(experts=3), "has shape (32, 2), expected (32, 3)"),
    (dict(calib_size=10 ** 30), "cannot build a FineSteer head"),
    (dict(layer=1), "lacks tensor base_model.model.model.layers.1.fsteer.gate.basis"),  # keys name the layer
    (dict(gate_layer=2), "fails its checksum"),
    (dict(gate_kind="soft"), "fails its checksum"),
    (dict(gate_pool="max"), "field 'gate_pool' is 'max', not one of last, mean"),
    (dict(gate_pool="mean"), "fails its checksum"),  # a last-token gate cannot be re-read as a mean one
])
def test_malformed_config_fields(adapter_copy, changes, fragment):
    edit_config(adapter_copy, **changes)
    assert fragment in load_error(adapter_copy)


def test_config_without_gate_pool_reads_the_last_token(adapter_copy):
    """Adapters saved before gate_pool existed load unchanged (same checksum, last-token gate)."""
    edit_config(adapter_copy, gate_pool=DELETE)
    head = load_adapter(tiny_model("llama"), adapter_copy)
    assert head.gate_pool == "last"


def test_harmless_config_edits_still_load(adapter_copy, tok):
    """Free-text fields and λ are not structural: editing them loads (λ is meant to be tunable)."""
    edit_config(adapter_copy, task="my task", base_model_name_or_path="elsewhere", strength=2.5, unknown_key=1)
    head = load_adapter(tiny_model("llama"), adapter_copy)
    assert head.strength == 2.5


# -- adapter_model.safetensors -------------------------------------------------------------------------

def test_no_weights_file(adapter_copy):
    (adapter_copy / WEIGHTS_NAME).unlink()
    assert f"has no {WEIGHTS_NAME}" in load_error(adapter_copy)


@pytest.mark.parametrize("name", ["adapter_model.bin", "pytorch_model.bin", "adapter_model.pt"])
def test_pickle_weights_are_refused_and_never_loaded(adapter_copy, name):
    (adapter_copy / WEIGHTS_NAME).rename(adapter_copy / name)
    line = load_error(adapter_copy)
    assert f"holds {name}, a pickle-based weights file, which is never loaded" in line
    assert "convert it to adapter_model.safetensors in a trusted environment" in line
    with pytest.raises(FSteerError, match="pickle-based"):
        adapter_summary(adapter_copy)


def test_a_stray_bin_next_to_safetensors_is_ignored(adapter_copy):
    (adapter_copy / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert load_adapter(tiny_model("llama"), adapter_copy).strength == 16.0


def test_missing_tensor(adapter_copy):
    edit_weights(adapter_copy, lambda t, k: t.pop(k))
    assert re.search(r"lacks tensor base_model\.model\.model\.layers\.2\.fsteer\.mose\.experts \(1 missing\)",
                     load_error(adapter_copy))


def test_unexpected_tensor(adapter_copy):
    edit_weights(adapter_copy, lambda t, k: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(2)))
    assert "has an unexpected tensor base_model.model.lm_head.weight" in load_error(adapter_copy)


def test_wrong_shape(adapter_copy):
    edit_weights(adapter_copy, lambda t, k: t.__setitem__(k, torch.zeros(32, 5)))
    assert "mose.experts has shape (32, 5), expected (32, 2)" in load_error(adapter_copy)


def test_wrong_dtype(adapter_copy):
    edit_weights(adapter_copy, lambda t, k: t.__setitem__(k, t[k].to(torch.int32)))
    assert "mose.experts has dtype torch.int32, expected a floating type" in load_error(adapter_copy)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_values(adapter_copy, value):
    def poison(t, k):
        t[k][0, 0] = value

    edit_weights(adapter_copy, poison)
    assert "mose.experts contains NaN or Inf values" in load_error(adapter_copy)


def test_changed_value_fails_the_checksum(adapter_copy):
    def nudge(t, k):
        t[k][3, 1] += 1e-3

    edit_weights(adapter_copy, nudge, keep_metadata=True)
    assert "fails its checksum" in load_error(adapter_copy)


def test_flipped_bit_in_the_data_fails_the_checksum(adapter_copy):
    path = adapter_copy / WEIGHTS_NAME
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    assert "fails its checksum" in load_error(adapter_copy)


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -1])
def test_truncated_or_empty_safetensors(adapter_copy, keep):
    path = adapter_copy / WEIGHTS_NAME
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    assert "is not a readable safetensors file" in load_error(adapter_copy)


def test_inspect_validates_too(adapter_copy):
    edit_weights(adapter_copy, lambda t, k: t.pop(k))
    with pytest.raises(FSteerError, match="lacks tensor"):
        adapter_summary(adapter_copy)


# -- saving is atomic --------------------------------------------------------------------------------

def test_atomic_folder_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with atomic_folder(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(out) as tmp:
        (tmp / "whole.txt").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "whole.txt").read_text() == "whole"
    with pytest.raises(FSteerError, match="already exists"):
        with atomic_folder(out):
            pass
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


# -- no unpickling anywhere ------------------------------------------------------------------------

def test_no_torch_load_or_pickle_in_the_package():
    import fsteer_export

    roots = [Path(fsteer_export.__file__).parent, Path(__file__).resolve().parents[1] / "cli"]
    offenders = []
    for root in roots:
        for f in root.rglob("*.py"):
            text = f.read_text(encoding="utf-8")
            for pattern in (r"\btorch\.load\s*\(", r"\bpickle\.loads?\s*\(", r"^\s*import pickle", r"\bfrom torch import load\b"):
                for m in re.finditer(pattern, text, flags=re.M):
                    offenders.append(f"{f.name}:{text.count(chr(10), 0, m.start()) + 1}")
    assert offenders == []


def test_read_config_and_weights_directly(adapter_copy):
    cfg = read_config(adapter_copy)
    state = read_weights(adapter_copy, cfg)
    assert set(state) >= {"gate.mu", "gate.basis", "gate.calib_scores", "mose.experts", "mose.query.weight"}
    assert all(v.dtype == torch.float32 for v in state.values())


def test_failed_overwrite_keeps_the_old_folder(tmp_path, monkeypatch):
    import os

    import fsteer_export.adapter as adapter_mod

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the old folder was moved aside; moving the new one in is interrupted
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(adapter_mod.os, "replace", flaky)
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
