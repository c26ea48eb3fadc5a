"""The steering module: per-row correctness, KV cache, gate = 0 ⇒ base model, G < L, all architectures."""

from __future__ import annotations

import pytest
import torch

from fsteer_export.activations import encode_prompt, pad_left
from fsteer_export.adapter import load_adapter
from fsteer_export.config import FineSteerConfig
from fsteer_export.data import demo_prompts
from fsteer_export.generate import generate, greedy_tokens
from fsteer_export.models import decoder_layers, model_type
from fsteer_export.steering import (FineSteerHead, SteeringLayer, add_adapter, generation_session, heads,
                                    remove_steering, steering_context, strength_override)
from fsteer_export.testing import ARCHITECTURES, tiny_model

POOL = demo_prompts("harmful")[:8] + demo_prompts("benign")[:8]
NEW = 8


def steered(model, trained):
    add_adapter(model, trained.config, state=trained.head.state_dict())
    return model


def gates_alone(model, tok, prompts):
    return [generate(model, tok, [p], max_new_tokens=1)[0].gate for p in prompts]


@pytest.fixture(scope="module", params=["last", "mean"])
def pooled(request):
    """The trained adapter, once with the gate on the last prompt token and once on the prompt mean."""
    return request.getfixturevalue("trained" if request.param == "last" else "trained_mean")


@pytest.fixture(scope="module")
def mixed(pooled, tok):
    """Prompts the trained gate fires on (g = 1) and prompts it leaves alone (g = 0), mixed lengths."""
    trained = pooled
    model = steered(tiny_model("llama"), trained)
    gates = gates_alone(model, tok, POOL)
    fired = [p for p, g in zip(POOL, gates) if g == 1.0][:4]
    quiet = [p for p, g in zip(POOL, gates) if g == 0.0][:4]
    assert len(fired) >= 2 and len(quiet) >= 2, f"the trained gate should split the pool, got {gates}"
    prompts = [fired[0], quiet[0], fired[1], quiet[1]] + fired[2:] + quiet[2:]
    lengths = {len(encode_prompt(tok, p)) for p in prompts}
    assert len(lengths) > 1  # the batch really is left-padded
    return prompts, [1.0 if p in fired else 0.0 for p in prompts]


def logits(model, tok, prompts):
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def layer_io(model, ids, mask, layer):
    """Hidden states and the (steered) output of decoder layer ``layer``, read at the wrapper.

    transformers 5 records ``output_hidden_states`` with hooks on the decoder-layer class, i.e. on
    the wrapped base layer: index L+1 shows layer L's output *before* steering, so we hook the wrapper.
    """
    seen = {}
    handle = decoder_layers(model)[layer].register_forward_hook(
        lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    try:
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    return hs, seen["out"]


# -- per-row correctness with a trained adapter -------------------------------------------------

def test_alone_equals_inside_left_padded_batch(pooled, tok, mixed):
    trained = pooled
    prompts, gate = mixed
    base = greedy_tokens(tiny_model("llama"), tok, prompts, NEW, batch_size=1)
    model = steered(tiny_model("llama"), trained)
    alone = greedy_tokens(model, tok, prompts, NEW, batch_size=1)
    batch = greedy_tokens(model, tok, prompts, NEW, batch_size=len(prompts))
    assert batch == alone
    for g, a, b in zip(gate, alone, base):
        if g == 1.0:
            assert a != b, "steering must change the greedy answer where the gate fires"
        else:
            assert a == b, "where the gate is 0 the answer must be the base model's"


def test_kv_cache_and_no_cache_give_the_same_tokens(pooled, tok, mixed):
    trained = pooled
    prompts, _ = mixed
    model = steered(tiny_model("llama"), trained)
    with_cache = greedy_tokens(model, tok, prompts, NEW, batch_size=len(prompts), use_cache=True)
    without = greedy_tokens(model, tok, prompts, NEW, batch_size=len(prompts), use_cache=False)
    assert with_cache == without
    out = generate(model, tok, prompts, max_new_tokens=NEW, use_cache=False)
    assert [o.gate for o in out] == [o.gate for o in generate(model, tok, prompts, max_new_tokens=NEW)]


def test_per_row_gate_values_in_a_mixed_batch(pooled, tok, mixed):
    trained = pooled
    prompts, gate = mixed
    model = steered(tiny_model("llama"), trained)
    out = generate(model, tok, prompts, max_new_tokens=2, batch_size=len(prompts))
    assert [o.gate for o in out] == gate
    assert len({o.gate for o in out}) == 2
    assert [o.gates for o in out] == [{"default": g} for g in gate]
    # The raw per-row state: one g per row, and λ·g·v is zero exactly on the g = 0 rows.
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    with torch.no_grad(), generation_session(model) as ctx:
        model(input_ids=ids, attention_mask=mask)
        g, state = ctx.gates["default"], ctx.states["default"]
    assert g.shape == (len(prompts),) and state.shape == (len(prompts), 32)
    assert g.tolist() == gate
    for row, value in enumerate(gate):
        assert (state[row].abs().sum() == 0) == (value == 0.0)


def test_gate_zero_rows_have_exactly_the_base_logits(pooled, tok, mixed):
    trained = pooled
    prompts, gate = mixed
    base = logits(tiny_model("llama"), tok, prompts)
    out = logits(steered(tiny_model("llama"), trained), tok, prompts)
    for row, g in enumerate(gate):
        if g == 0.0:
            assert torch.equal(out[row], base[row])
        else:
            assert not torch.allclose(out[row, -1], base[row, -1])


def test_gate_forced_to_zero_is_the_base_model(trained, tok):
    """Calibration scores above any possible energy ratio (≤ 1) ⇒ F(s) = 0 ⇒ g = 0 everywhere."""
    state = {k: v.clone() for k, v in trained.head.state_dict().items()}
    state["gate.calib_scores"].fill_(2.0)
    base_model = tiny_model("llama")
    model = tiny_model("llama")
    add_adapter(model, trained.config, state=state)
    prompts = POOL[:6]
    assert torch.equal(logits(model, tok, prompts), logits(base_model, tok, prompts))
    assert greedy_tokens(model, tok, prompts, NEW, batch_size=6) == greedy_tokens(base_model, tok, prompts, NEW, batch_size=6)
    assert {o.gate for o in generate(model, tok, prompts, max_new_tokens=1)} == {0.0}


def test_remove_steering_and_strength_zero_give_the_base_model(trained, tok):
    prompts = POOL[:4]
    base = logits(tiny_model("llama"), tok, prompts)
    model = steered(tiny_model("llama"), trained)
    assert not torch.equal(logits(model, tok, prompts), base)
    with strength_override(model, 0.0):
        assert torch.equal(logits(model, tok, prompts), base)
    remove_steering(model)
    assert not any(isinstance(layer, SteeringLayer) for layer in decoder_layers(model))
    assert torch.equal(logits(model, tok, prompts), base)


def test_saved_folder_loads_to_the_same_outputs(trained, tok, adapter_dir):
    a = steered(tiny_model("llama"), trained)
    b = tiny_model("llama")
    head = load_adapter(b, adapter_dir)
    assert head.strength == trained.config.strength
    assert list(heads(b)) == ["default"]
    assert torch.equal(logits(a, tok, POOL[:5]), logits(b, tok, POOL[:5]))


def test_gate_layer_before_steering_layer(trained, tok, mixed):
    """G = 1 < L = 2: g reads h_1 (input of layer 1), v reads h_2, λ·g·v lands on h_3 only."""
    cfg = trained.config
    assert cfg.gate_layer == 1 and cfg.layer == 2
    prompts, _ = mixed
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    base = tiny_model("llama")
    model = steered(tiny_model("llama"), trained)
    with torch.no_grad():
        hb = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        hs, out = layer_io(model, ids, mask, cfg.layer)
        head = trained.head
        g, v = head.gate(hb[1][:, -1]), head.mose(hb[2][:, -1])
    for k in range(cfg.layer + 1):
        assert torch.equal(hs[k], hb[k])
    expected = hb[3] + cfg.strength * (g[:, None] * v)[:, None, :]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the gate really reads layer 1: read at layer 2 it would give other values on this batch
    with torch.no_grad():
        assert not torch.equal(head.gate(hb[2][:, -1]), g)
    assert isinstance(decoder_layers(model)[1], SteeringLayer) and decoder_layers(model)[1].taps == ["default"]


# -- every architecture ----------------------------------------------------------------------------

def random_head(model, layer=2, gate_layer=1, strength=4.0, seed=0, gate_pool="last"):
    """A FineSteer head with random (valid) values: gate open on every prompt, non-zero v."""
    cfg = FineSteerConfig(layer=layer, gate_layer=gate_layer, hidden_size=32, gate_kind="quantile", gate_rank=4,
                          calib_size=8, experts=3, residual_rank=4, key_dim=8, mlp_hidden=16, strength=strength,
                          base_model_type=model_type(model), base_num_layers=4, gate_pool=gate_pool)
    gen = torch.Generator().manual_seed(seed)
    head = FineSteerHead(cfg)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in head.state_dict().items()}
    state["gate.basis"] = torch.linalg.qr(torch.randn(32, 4, generator=gen))[0]
    state["gate.calib_scores"] = torch.zeros(8)  # F(s) = 1 ⇒ g = 1
    state["gate.eps"], state["gate.gamma"] = torch.tensor(0.05), torch.tensor(8.0)
    state["mose.in_scale"] = torch.tensor(1.0)
    return cfg, state


@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_steers_per_row_with_cache_parity(arch, pool, tok):
    from fsteer_export.activations import position_ids
    from fsteer_export.steering import mean_pool, prompt_pool_weights

    prompts = ["Hello there", "Write a poem about the sea and the moon please"]
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    base = tiny_model(arch)
    model = tiny_model(arch)
    cfg, state = random_head(model, gate_pool=pool)
    head = add_adapter(model, cfg, state=state)
    with torch.no_grad():
        hb = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        hs, out = layer_io(model, ids, mask, 2)
        h_gate = hb[1][:, -1] if pool == "last" else mean_pool(hb[1], prompt_pool_weights(mask, None, tuple(mask.shape)))
        g, v = head.gate(h_gate), head.mose(hb[2][:, -1])
        with generation_session(model) as ctx:  # what the steering layer actually fed the gate
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
            fed = ctx.gate_inputs["default"][pool]
        with torch.no_grad():
            want = base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                        output_hidden_states=True).hidden_states[1]
        want = want[:, -1] if pool == "last" else mean_pool(want, prompt_pool_weights(mask, None, tuple(mask.shape)))
        torch.testing.assert_close(fed, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(hs[2], hb[2])
    assert g.min() == 1.0 and v.abs().max() > 0
    torch.testing.assert_close(out, hb[3] + 4.0 * (g[:, None] * v)[:, None, :], rtol=1e-5, atol=1e-5)
    alone = greedy_tokens(model, tok, prompts, 6, batch_size=1)
    assert greedy_tokens(model, tok, prompts, 6, batch_size=2) == alone
    assert greedy_tokens(model, tok, prompts, 6, batch_size=2, use_cache=False) == alone
    remove_steering(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits)


def test_context_is_shared_and_reset_per_prompt(trained, tok):
    model = steered(tiny_model("llama"), trained)
    ctx = steering_context(model)
    generate(model, tok, POOL[:2], max_new_tokens=2)
    first = dict(ctx.gates)
    generate(model, tok, POOL[2:5], max_new_tokens=2)
    assert ctx.gates["default"].shape == (3,) and first["default"].shape == (2,)


def test_adapter_with_the_same_name_twice_is_refused(trained):
    from fsteer_export.errors import FSteerError

    model = steered(tiny_model("llama"), trained)
    with pytest.raises(FSteerError, match="already loaded"):
        add_adapter(model, trained.config, state=trained.head.state_dict())


# -- the mean-pooled gate input ------------------------------------------------------------------

def test_prompt_pool_weights():
    from fsteer_export.steering import prompt_pool_weights

    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert prompt_pool_weights(left, None, (3, 5)).tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    last = torch.tensor([2, 3])  # e.g. scoring prompt + answer in one pass: the prompt ends at 3
    assert prompt_pool_weights(right, last, (2, 5)).tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]]
    assert prompt_pool_weights(None, None, (1, 3)).tolist() == [[0, 1, 1]]


def test_mean_gate_reads_what_training_extracted(trained_mean, tok, mixed):
    """The runtime's pooled gate input equals the extraction's, row by row, in a left-padded batch."""
    from fsteer_export.activations import prompt_states

    prompts, _ = mixed
    cfg = trained_mean.config
    assert cfg.gate_pool == "mean" and cfg.gate_layer < cfg.layer
    model = steered(tiny_model("llama"), trained_mean)
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    from fsteer_export.activations import position_ids
    with torch.no_grad(), generation_session(model) as ctx:
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
        got = ctx.gate_inputs["default"]["mean"]
    base = tiny_model("llama")
    want = prompt_states(base, tok, prompts, [cfg.gate_layer], pool="mean")[cfg.gate_layer]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    last = prompt_states(base, tok, prompts, [cfg.gate_layer])[cfg.gate_layer]
    assert not torch.allclose(want, last)  # the two pools really differ


def test_mean_gate_ignores_padding_and_other_rows(trained_mean, tok):
    """Right padding with an explicit last index, left padding and a lone prompt: the same gate."""
    from fsteer_export.steering import prompt_end

    model = steered(tiny_model("llama"), trained_mean)
    prompts = [POOL[0], POOL[9], "Hi"]
    seqs = [encode_prompt(tok, p) for p in prompts]
    alone = []
    for s in seqs:
        with torch.no_grad(), generation_session(model) as ctx:
            model(input_ids=torch.tensor([s]))
            alone.append(ctx.gate_inputs["default"]["mean"][0])
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad(), generation_session(model) as ctx:
        model(input_ids=ids, attention_mask=mask)
        right = ctx.gate_inputs["default"]["mean"]
    # One pass over prompt + answer (scoring): the gate reads the prompt part only.
    answer = [5, 6, 7]
    with torch.no_grad(), generation_session(model) as ctx, prompt_end(model, torch.tensor([len(seqs[0]) - 1])):
        model(input_ids=torch.tensor([seqs[0] + answer]))
        scored = ctx.gate_inputs["default"]["mean"][0]
    for i in range(len(prompts)):
        torch.testing.assert_close(right[i], alone[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored, alone[0], rtol=1e-5, atol=1e-5)
