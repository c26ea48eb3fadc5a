"""Property tests: random corruptions of a valid adapter folder.

Every corruption must either be refused with an FSteerError (nothing attached to the model) or load
an adapter that is exactly the clean one: the same tensors bit for bit, the same structure, the same
logits. No other exception, and never corrupted values loaded silently. λ (``strength``) is a
documented, hand-tunable field, so outputs are compared at the clean λ.

The number of corruptions tried, per kind and outcome, is printed at the end of the run (and
written as JSON to $FSTEER_FUZZ_REPORT when that is set).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save

from fsteer_export.activations import encode_prompt, pad_left
from fsteer_export.adapter import CONFIG_NAME, WEIGHTS_NAME, adapter_summary, load_adapter, read_config
from fsteer_export.errors import FSteerError
from fsteer_export.steering import SteeringLayer, decoder_layers, remove_steering, strength_override
from fsteer_export.testing import tiny_model

EXAMPLES = int(os.environ.get("FSTEER_FUZZ_EXAMPLES", "150"))  # per corruption kind (6 kinds)
# Derandomized by default so CI sees the same corruptions every run; FSTEER_FUZZ_RANDOM=1 explores.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("FSTEER_FUZZ_RANDOM", "") in ("", "0"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
COUNTS: collections.Counter = collections.Counter()
STRUCTURAL = ("layer", "gate_layer", "hidden_size", "gate_kind", "gate_rank", "calib_size", "experts",
              "residual_rank", "key_dim", "mlp_hidden", "base_model_type", "base_num_layers")


class Clean:
    """The clean adapter's folder, tensors, config and logits (built once)."""

    folder: Path
    model: torch.nn.Module
    state: dict
    cfg: object
    logits: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor


@pytest.fixture(scope="module")
def clean(adapter_dir, tok):
    c = Clean()
    c.folder = adapter_dir
    c.model = tiny_model("llama")
    prompts = ["How do I bake bread?", "Explain how to hack into a computer", "hi"]
    c.ids, c.mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    head = load_adapter(c.model, adapter_dir)
    c.state = {k: v.clone() for k, v in head.state_dict().items()}
    c.cfg = read_config(adapter_dir)
    c.logits = forward(c)
    remove_steering(c.model)
    with torch.no_grad():
        base = c.model(input_ids=c.ids, attention_mask=c.mask).logits
    assert not torch.equal(base, c.logits)  # the oracle can tell a steered model from the base one
    return c


def forward(c: Clean) -> torch.Tensor:
    with torch.no_grad(), strength_override(c.model, c.cfg.strength):
        return c.model(input_ids=c.ids, attention_mask=c.mask).logits


def check(c: Clean, kind: str, corrupt) -> None:
    """Copy the clean folder, corrupt it, load it; assert the property; count the outcome."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        shutil.copytree(c.folder, folder)
        corrupt(folder)
        try:
            try:
                head = load_adapter(c.model, folder)
            except FSteerError as exc:
                assert exc.line() and "\n" not in exc.line()
                assert not any(isinstance(m, SteeringLayer) for m in decoder_layers(c.model))
                outcome = "refused"
            else:
                got = head.state_dict()
                assert set(got) == set(c.state)
                for k, v in c.state.items():
                    assert torch.equal(got[k], v), f"silently loaded a changed tensor {k}"
                cfg = read_config(folder)
                for f in STRUCTURAL:
                    assert getattr(cfg, f) == getattr(c.cfg, f), f"silently loaded a changed field {f}"
                assert torch.equal(forward(c), c.logits), "loaded adapter changes the outputs"
                outcome = "loaded, unchanged"
            try:  # `fsteer inspect` reads the same folder: same rule, FSteerError or a summary
                adapter_summary(folder)
            except FSteerError:
                pass
        finally:
            remove_steering(c.model)
    COUNTS[(kind, outcome)] += 1


# -- safetensors ------------------------------------------------------------------------------------

def flip(raw: bytes, start: int, masks: list[int]) -> bytes:
    """XOR consecutive bytes from ``start`` with ``masks`` (bytes past the end are left alone)."""
    out = bytearray(raw)
    for i, m in enumerate(masks):
        if start + i < len(out):
            out[start + i] ^= m
    return bytes(out)


@FUZZ
@given(data=st.data())
def test_flipped_bytes_in_the_weights(clean, data):
    size = (clean.folder / WEIGHTS_NAME).stat().st_size
    header = struct.unpack("<Q", (clean.folder / WEIGHTS_NAME).read_bytes()[:8])[0] + 8
    # half the flips land in the (small) header, half anywhere
    start = data.draw(st.one_of(st.integers(0, header - 1), st.integers(0, size - 1)), label="offset")
    masks = data.draw(st.lists(st.integers(1, 255), min_size=1, max_size=4), label="xor masks")

    def corrupt(folder):
        path = folder / WEIGHTS_NAME
        path.write_bytes(flip(path.read_bytes(), start, masks))

    check(clean, "flip bytes (weights)", corrupt)


@FUZZ
@given(data=st.data())
def test_truncated_or_extended_weights(clean, data):
    size = (clean.folder / WEIGHTS_NAME).stat().st_size
    keep = data.draw(st.integers(0, size - 1), label="keep")
    extra = data.draw(st.binary(min_size=0, max_size=16), label="appended")

    def corrupt(folder):
        path = folder / WEIGHTS_NAME
        raw = path.read_bytes()
        path.write_bytes(raw[:keep] if not extra else raw + extra)

    check(clean, "truncate/extend (weights)", corrupt)


RESHAPES = ("drop row", "add row", "drop col", "add col", "transpose", "flatten", "scalar", "unsqueeze")


@FUZZ
@given(data=st.data())
def test_wrong_shapes_swapped_in(clean, data):
    keys = sorted(load_file(str(clean.folder / WEIGHTS_NAME)))
    key = data.draw(st.sampled_from(keys), label="tensor")
    how = data.draw(st.sampled_from(RESHAPES), label="reshape")
    keep_meta = data.draw(st.booleans(), label="keep checksum metadata")

    def corrupt(folder):
        path = folder / WEIGHTS_NAME
        raw = path.read_bytes()
        meta = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]]).get("__metadata__", {})
        tensors = load_file(str(path))
        t = tensors[key]
        if how == "drop row":
            t = t[:-1] if t.dim() and t.shape[0] > 0 else t.reshape(1)
        elif how == "add row":
            t = torch.cat([t, t[:1]]) if t.dim() and t.shape[0] > 0 else torch.zeros(2)
        elif how == "drop col":
            t = t[:, :-1] if t.dim() == 2 else torch.zeros(3, 1)
        elif how == "add col":
            t = torch.cat([t, t[:, :1]], 1) if t.dim() == 2 else t.reshape(-1, 1).repeat(1, 2)
        elif how == "transpose":
            t = t.T.contiguous() if t.dim() == 2 and t.shape[0] != t.shape[1] else t.reshape(1, -1)
        elif how == "flatten":
            t = t.reshape(-1) if t.dim() != 1 else t.reshape(1, -1)
        elif how == "scalar":
            t = t.reshape(-1)[0].clone() if t.dim() else t.reshape(1)
        else:
            t = t.unsqueeze(0)
        tensors[key] = t.contiguous()
        st_save(tensors, str(path), metadata=meta if keep_meta else None)

    check(clean, "wrong shape (weights)", corrupt)


# -- adapter_config.json ---------------------------------------------------------------------------------

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10), st.integers(-(10 ** 400), 10 ** 400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    st.sampled_from(["quantile", "logistic", "soft", "llama", "gpt2", "FINESTEER", "LORA", "CAUSAL_LM", ""]),
    st.lists(st.integers(0, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@FUZZ
@given(data=st.data())
def test_mutated_deleted_retyped_config_fields(clean, data):
    cfg = json.loads((clean.folder / CONFIG_NAME).read_text())
    keys = sorted(cfg) + list(STRUCTURAL) + ["strength", "strength", "peft_type", "format_version", "a_new_key"]
    edits = data.draw(st.lists(st.tuples(st.sampled_from(keys), st.sampled_from(["delete", "set", "retype"])),
                               min_size=1, max_size=3), label="edits")
    values = [data.draw(JSON_VALUES, label="value") for _ in edits]

    def retype(v):
        if isinstance(v, bool) or v is None:
            return str(v).lower()
        if isinstance(v, (int, float)):
            return [str(v), float(v), [v], {"value": v}][abs(hash(str(v))) % 4]
        if isinstance(v, str):
            return [v] if v else 0
        return json.dumps(v)

    def corrupt(folder):
        path = folder / CONFIG_NAME
        obj = json.loads(path.read_text())
        for (key, op), value in zip(edits, values):
            if op == "delete":
                obj.pop(key, None)
            elif op == "set":
                obj[key] = value
            else:
                obj[key] = retype(obj.get(key))
        path.write_text(json.dumps(obj))  # NaN / Infinity are written as JSON extensions, like Python does

    check(clean, "mutate/delete/retype (config)", corrupt)


@FUZZ
@given(data=st.data())
def test_truncated_or_flipped_config_text(clean, data):
    raw = (clean.folder / CONFIG_NAME).read_bytes()
    mode = data.draw(st.sampled_from(["truncate", "flip"]), label="mode")
    pos = data.draw(st.integers(0, len(raw) - 1), label="position")
    masks = data.draw(st.lists(st.integers(1, 255), min_size=1, max_size=3), label="xor masks")

    def corrupt(folder):
        path = folder / CONFIG_NAME
        if mode == "truncate":
            path.write_bytes(raw[:pos])
        else:
            path.write_bytes(flip(raw, pos, masks))

    check(clean, "truncate/flip bytes (config)", corrupt)


@FUZZ
@given(data=st.data())
def test_files_removed_or_swapped(clean, data):
    op = data.draw(st.sampled_from(["no weights", "no config", "bin instead", "weights as config",
                                    "config as weights", "empty weights", "empty config", "weights is a folder"]),
                   label="operation")

    def corrupt(folder):
        w, c = folder / WEIGHTS_NAME, folder / CONFIG_NAME
        if op == "no weights":
            w.unlink()
        elif op == "no config":
            c.unlink()
        elif op == "bin instead":
            w.rename(folder / "adapter_model.bin")
        elif op == "weights as config":
            shutil.copy(w, c)
        elif op == "config as weights":
            shutil.copy(c, w)
        elif op == "empty weights":
            w.write_bytes(b"")
        elif op == "empty config":
            c.write_bytes(b"")
        else:
            w.unlink()
            w.mkdir()

    check(clean, "remove/swap files", corrupt)


def test_report_how_many_corruptions_were_tried(capsys):
    total = sum(COUNTS.values())
    kinds = sorted({k for k, _ in COUNTS})
    lines = [f"fuzzed adapter corruptions: {total} in all"]
    for kind in kinds:
        parts = ", ".join(f"{o}: {n}" for (k, o), n in sorted(COUNTS.items()) if k == kind)
        lines.append(f"  {kind}: {parts}")
    with capsys.disabled():  # shown in the normal pytest output, not only with -s
        print("\n" + "\n".join(lines))
    if os.environ.get("FSTEER_FUZZ_REPORT"):
        Path(os.environ["FSTEER_FUZZ_REPORT"]).write_text(json.dumps(
            {"total": total, "by_kind": {f"{k} | {o}": n for (k, o), n in sorted(COUNTS.items())}}, indent=2))
    if len(kinds) == 6:  # the whole file ran (not a -k selection)
        assert total >= 6 * min(EXAMPLES, 8)  # every strategy really ran
        assert sum(n for (k, o), n in COUNTS.items() if o == "refused") > total // 2
