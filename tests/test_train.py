"""SCS and MoSE on synthetic data, the training pipeline's choices, determinism and its error cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fsteer_export.activations import encode_prompt, encode_prompts, prompt_states
from fsteer_export.adapter import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from fsteer_export.errors import FSteerError
from fsteer_export.generate import generate
from fsteer_export.models import LoadedModel, decoder_layers
from fsteer_export.mose import MixtureOfSteeringExperts, choose_experts, fit_mose
from fsteer_export.scs import SubspaceGate, fit_gate
from fsteer_export.testing import tiny_model
from fsteer_export.train import MIN_PROMPTS, TrainOptions, train


D = 24


def subspace_data(n, basis, mu, gen, spread=4.0, noise=0.05):
    return mu + (torch.randn(n, basis.shape[1], generator=gen) * spread) @ basis.T + noise * torch.randn(n, D, generator=gen)


@pytest.fixture(scope="module")
def ir_data():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, 3, generator=gen))[0]
    mu = torch.randn(D, generator=gen)
    other = torch.linalg.qr(torch.randn(D, D, generator=gen))[0][:, :6]
    other = other - basis @ (basis.T @ other)  # directions orthogonal to the IR subspace
    return {"train": subspace_data(80, basis, mu, gen), "calib": subspace_data(40, basis, mu, gen),
            "val": subspace_data(40, basis, mu, gen), "mu": mu, "basis": basis,
            "off": mu + (torch.randn(40, 6, generator=gen) * 4.0) @ other.T,
            "neg_train": torch.randn(80, D, generator=gen) * 3.0 + 2.0, "neg_val": torch.randn(40, D, generator=gen) * 3.0 + 2.0}


# -- SCS -------------------------------------------------------------------------------------------

def test_energy_ratio_is_in_unit_interval(ir_data):
    gate = fit_gate(ir_data["train"], ir_data["calib"], rank=3)
    gen = torch.Generator().manual_seed(1)
    probes = torch.cat([ir_data["val"], ir_data["off"], torch.randn(50, D, generator=gen) * 100,
                        ir_data["mu"][None].clone(), torch.zeros(1, D)])
    s, p = gate.project(probes)
    assert s.shape == (len(probes),) and p.shape == (len(probes), 3)
    assert torch.all(s >= 0) and torch.all(s <= 1 + 1e-6)
    assert s[: len(ir_data["val"])].min() > 0.9  # IR prompts live in the subspace
    assert s[len(ir_data["val"]): len(ir_data["val"]) + len(ir_data["off"])].max() < 0.2  # off it: low


def test_quantile_gate_is_one_above_eps_and_exactly_zero_below_all_calibration(ir_data):
    gate = fit_gate(ir_data["train"], ir_data["calib"], kind="quantile", rank=3, eps=0.05)
    assert gate.kind == "quantile" and gate.calib_scores.shape == (40,)
    assert torch.all(gate.calib_scores[1:] >= gate.calib_scores[:-1])  # stored sorted
    probes = torch.cat([ir_data["val"], ir_data["off"]])
    s, _ = gate.project(probes)
    g = gate(probes)
    f = gate.cdf(s)
    assert torch.all((g >= 0) & (g <= 1))
    assert torch.equal(g[f >= 0.05], torch.ones_like(g[f >= 0.05]))  # = 1 wherever F(s) ≥ ε
    below = s < gate.calib_scores.min()
    assert below.sum() >= len(ir_data["off"])
    assert torch.equal(g[below], torch.zeros_like(g[below]))  # exact 0 below every calibration score
    # between the two lowest calibration scores: F(s) = 1/40 < ε ⇒ g = (F/ε)^γ, strictly inside (0, 1)
    s_mid = float(gate.calib_scores[0] + gate.calib_scores[1]) / 2
    inside = gate.basis[:, 0]
    outside = torch.randn(D, generator=torch.Generator().manual_seed(5))
    outside = outside - gate.basis @ (gate.basis.T @ outside)
    outside = outside / outside.norm()
    h = gate.mu + math.sqrt(s_mid) * inside + math.sqrt(1 - s_mid) * outside
    assert float(gate.project(h[None])[0]) == pytest.approx(s_mid, abs=1e-5)
    assert float(gate.cdf(gate.project(h[None])[0])) == pytest.approx(1 / 40)
    g_mid = float(gate(h[None]))
    assert 0 < g_mid < 1 and g_mid == pytest.approx((1 / 40 / 0.05) ** float(gate.gamma), rel=1e-4)
    assert (gate(ir_data["val"]) == 1).float().mean() >= 0.85


def test_logistic_gate_separates_ir_from_negatives(ir_data):
    gate = fit_gate(ir_data["train"], ir_data["calib"], kind="logistic", rank=3, negatives=ir_data["neg_train"])
    g_ir, g_neg = gate(ir_data["val"]), gate(ir_data["neg_val"])
    assert torch.all((g_ir >= 0) & (g_ir <= 1)) and torch.all((g_neg >= 0) & (g_neg <= 1))
    assert g_ir.mean() > 0.9
    assert (g_neg == 0).float().mean() >= 0.9  # clear negatives get an exact 0
    score = gate.score(torch.cat([ir_data["val"], ir_data["neg_val"]]))
    assert torch.all((score >= 0) & (score <= 1))
    with pytest.raises(FSteerError, match="needs general"):
        fit_gate(ir_data["train"], ir_data["calib"], kind="logistic", rank=3)


def test_logistic_gate_folds_standardization_and_uses_out_of_fold_threshold(ir_data):
    """The runtime formula (weights · [s, p] + bias) equals sklearn's fitted probabilities on the
    standardized features, and the ramp starts at the 99th percentile of out-of-fold negative
    probabilities, which is never below the in-sample one's (in-sample scores are optimistic)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    gate = fit_gate(ir_data["train"], ir_data["calib"], kind="logistic", rank=3, negatives=ir_data["neg_train"])
    pos, neg = torch.cat([ir_data["train"], ir_data["calib"]]), ir_data["neg_train"]
    with torch.no_grad():
        x = torch.cat([torch.cat([s[:, None], p], 1) for s, p in (gate.project(pos), gate.project(neg))]).double().numpy()
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    xs = (x - x.mean(0)) / (x.std(0) + 1e-9)
    clf = LogisticRegression(C=0.1, max_iter=5000, class_weight="balanced", random_state=0).fit(xs, y)
    probs = gate.score(torch.cat([pos, neg])).double().numpy()
    assert np.allclose(probs, clf.predict_proba(xs)[:, 1], atol=1e-5)
    oof = cross_val_predict(LogisticRegression(C=0.1, max_iter=5000, class_weight="balanced", random_state=0), xs, y,
                            method="predict_proba", cv=StratifiedKFold(5, shuffle=True, random_state=0))[:, 1]
    assert float(gate.lo) == pytest.approx(min(np.quantile(oof[y == 0], 0.99), 0.95), abs=1e-6)
    assert float(gate.hi) == pytest.approx(float(gate.lo) + 0.05)
    assert float(gate.lo) >= np.quantile(clf.predict_proba(xs)[y == 0, 1], 0.99) - 1e-9


def test_logistic_gate_ranks_are_capped_for_wide_models():
    from fsteer_export.train import gate_ranks

    assert gate_ranks("logistic", 576) == [32, 64, 128]
    assert gate_ranks("logistic", 4096) == [32, 64]  # keeps a d = 4096 adapter under 5 MB
    assert gate_ranks("quantile", 576) == [8, 16, 32]


def test_soft_gate_and_unknown_kind(ir_data):
    gate = fit_gate(ir_data["train"], ir_data["calib"], kind="soft", rank=3)
    g = gate(torch.cat([ir_data["val"], ir_data["off"]]))
    assert torch.all((g >= 0) & (g <= 1))
    assert g[:40].mean() > 0.9 and g[40:].max() == 0
    with pytest.raises(FSteerError, match="unknown gate kind 'sigmoid'"):
        SubspaceGate(D, 3, 4, kind="sigmoid")
    with pytest.raises(FSteerError, match="at least 2 training and 1 calibration"):
        fit_gate(ir_data["train"][:1], ir_data["calib"])


# -- MoSE ------------------------------------------------------------------------------------------

def clustered(n_per=40, k=3, seed=0):
    """δ in k well-separated directions; each cluster's prompt states sit around their own centre."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(D, k, generator=gen))[0].T * 5.0
    centres = torch.randn(k, D, generator=gen) * 3.0
    labels = torch.arange(k).repeat_interleave(n_per)
    h = centres[labels] + 0.3 * torch.randn(len(labels), D, generator=gen)
    delta = dirs[labels] * (1 + 0.1 * torch.randn(len(labels), 1, generator=gen)) + 0.1 * torch.randn(len(labels), D, generator=gen)
    perm = torch.randperm(len(labels), generator=gen)
    return h[perm], delta[perm], labels[perm]


def test_calinski_harabasz_finds_the_number_of_clusters():
    for k in (2, 3, 5):
        _, delta, labels = clustered(k=k, n_per=25, seed=k)
        found, chosen = choose_experts(delta, seed=0)
        assert chosen == k
        # every found cluster is one true cluster
        for c in range(k):
            assert len(set(labels[torch.as_tensor(found == c)].tolist())) == 1
    _, delta, _ = clustered()
    assert choose_experts(delta, experts=4)[1] == 4
    with pytest.raises(FSteerError, match="larger than the number of training examples"):
        choose_experts(delta[:5], experts=6)


def test_trained_mose_beats_the_mean_vector_on_clustered_data():
    h, delta, _ = clustered()
    fit = fit_mose(h, delta, seed=0)
    assert isinstance(fit.module, MixtureOfSteeringExperts) and fit.module.num_experts == 3
    assert fit.val_loss < 0.25 * fit.baseline_val_loss  # CAA's single mean vector is far worse
    alpha = fit.module.routing(h)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(len(h)))
    assert not any(p.requires_grad for p in fit.module.parameters())  # frozen after fitting
    # fresh data from the same clusters: still much better than the mean vector
    h2, delta2, _ = clustered(seed=0, n_per=40)
    with torch.no_grad():
        err = ((fit.module(h2) - delta2) ** 2).sum(-1).mean()
    base = ((delta.mean(0) - delta2) ** 2).sum(-1).mean()
    assert err < 0.25 * base


def test_mose_fit_is_deterministic():
    h, delta, _ = clustered()
    a, b = fit_mose(h, delta, seed=3), fit_mose(h, delta, seed=3)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# -- the pipeline ----------------------------------------------------------------------------------

def test_training_report_records_the_choices(trained):
    r, cfg = trained.report, trained.config
    assert (r["layer"], r["gate_layer"], r["gate_kind"], r["gate_rank"]) == (2, 1, "quantile", 2)
    assert cfg.strength == 16.0 and cfg.base_model_type == "llama" and cfg.base_num_layers == 4
    assert r["experts"] == cfg.experts >= 1
    from fsteer_export.data import demo_prompts
    assert r["counts"]["train_pairs"] + r["counts"]["calibration"] + r["counts"]["validation"] == len(demo_prompts("harmful"))
    assert 0 <= r["gate_validation"]["tpr"] <= 1
    assert "timings_s" in r and "timings_s" not in cfg.training  # timings stay out of the adapter files


def test_same_seed_and_data_give_byte_identical_adapter_files(trained, adapter_dir, tok, tmp_path, monkeypatch,
                                                              train_kw):
    monkeypatch.setenv("FSTEER_CACHE", str(tmp_path / "fresh-cache"))  # recompute activations too
    again = train(LoadedModel(tiny_model("llama"), tok, "tiny-llama"), ["demo:harmful"], ["demo:benign"],
                  TrainOptions(**train_kw))
    assert (tmp_path / "fresh-cache" / "activations").is_dir()
    out = save_adapter(tmp_path / "again", again.config, again.head, report=again.report, plots=False)
    for name in (WEIGHTS_NAME, CONFIG_NAME, "README.md"):
        assert (out / name).read_bytes() == (adapter_dir / name).read_bytes(), name


def tiny_lm(tok, **kw):
    return LoadedModel(tiny_model("llama", **kw), tok, "tiny")


@pytest.mark.parametrize("opts,fragment", [
    (dict(layer=99), "--layer 99 is out of range for this model (4 decoder layers)"),
    (dict(layer=-1), "--layer -1 is out of range"),
    (dict(layer=1, gate_layer=2), "--gate-layer 2 is after --layer 1"),
    (dict(layer=2, gate_layer=7), "--gate-layer 7 is out of range"),
    (dict(task="poetry"), "unknown task 'poetry'"),
])
def test_bad_options_fail_before_any_work(tok, opts, fragment, monkeypatch):
    import fsteer_export.train as tr

    monkeypatch.setattr(tr, "pair_activations", lambda *a, **k: pytest.fail("must fail before extraction"))
    with pytest.raises(FSteerError) as info:
        train(tiny_lm(tok), ["demo:harmful"], opts=TrainOptions(**opts))
    assert fragment in info.value.line() and " — fix: " in info.value.line()


def test_too_few_examples_for_calibration(tok, tmp_path):
    f = tmp_path / "few.txt"
    f.write_text("\n".join(f"prompt number {i}" for i in range(MIN_PROMPTS - 4)))
    with pytest.raises(FSteerError) as info:
        train(tiny_lm(tok), [str(f)], opts=TrainOptions(layer=2))
    assert f"only {MIN_PROMPTS - 4} usable examples" in info.value.line() and f"at least {MIN_PROMPTS}" in info.value.line()


def test_duplicates_count_against_the_minimum_and_are_stated(tok, tmp_path, capsys):
    f = tmp_path / "dups.txt"
    f.write_text("\n".join(f"prompt number {i % 6}" for i in range(30)))
    with pytest.raises(FSteerError, match="only 6 usable examples after removing duplicates"):
        train(tiny_lm(tok), [str(f)], opts=TrainOptions(layer=2))
    assert "warning: dropped 24 duplicate prompt(s)" in capsys.readouterr().err


def test_fewer_examples_than_experts(tok, tmp_path):
    f = tmp_path / "twenty.txt"
    f.write_text("\n".join(f"prompt number {i}" for i in range(20)))
    with pytest.raises(FSteerError) as info:
        train(tiny_lm(tok), [str(f)], opts=TrainOptions(layer=2, experts=15))
    assert "--experts 15 is larger than the number of training examples (12" in info.value.line()


def nan_model(layer=1):
    model = tiny_model("llama")
    with torch.no_grad():
        for p in decoder_layers(model)[layer].parameters():
            p.fill_(float("nan"))
    return model


def test_nan_activations_name_the_layer(tok):
    with pytest.raises(FSteerError) as info:
        prompt_states(nan_model(1), tok, ["hello", "a second prompt"], [2])
    assert "NaN/Inf activations at the input of layer 2" in info.value.line()
    # layers before the broken one are fine
    assert torch.isfinite(prompt_states(nan_model(1), tok, ["hello"], [1])[1]).all()


def test_nan_activations_during_training(tok, fsteer_cache):
    with pytest.raises(FSteerError) as info:
        train(LoadedModel(nan_model(1), tok, "nan-model"), ["demo:harmful"], opts=TrainOptions(layer=2, gate_layer=2))
    assert "NaN/Inf activations" in info.value.line() and "layer 2" in info.value.line()
    assert not list((fsteer_cache / "activations").glob("*.tmp"))  # nothing half-written in the cache


def test_prompts_longer_than_the_context_are_truncated_from_the_left(tok, capsys):
    model = tiny_model("llama")  # 256 positions
    long = "Tell me everything about bread. " * 120
    ids = encode_prompt(tok, long)
    assert len(ids) > 256
    cut = encode_prompts(tok, [long, "short"], 200)
    err = capsys.readouterr().err
    assert "warning: 1 prompt(s) longer than the model's context allows" in err and "truncated from the left" in err
    assert len(cut[0]) == 200 and cut[0] == ids[-200:]
    tail = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert cut[0][-len(tail):] == tail  # the chat template's end (generation prompt) is kept
    assert cut[1] == encode_prompt(tok, "short")
    states = prompt_states(model, tok, [long, "short"], [2])[2]
    assert torch.isfinite(states).all() and "truncated from the left" in capsys.readouterr().err
    out = generate(model, tok, [long], max_new_tokens=4)
    assert len(out) == 1 and "truncated from the left" in capsys.readouterr().err
    with pytest.raises(FSteerError, match="--max-new-tokens 300 does not fit the model's context"):
        generate(model, tok, ["hi"], max_new_tokens=300)


def test_logistic_gate_without_general_prompts(tok):
    with pytest.raises(FSteerError, match="needs general"):
        train(tiny_lm(tok), ["demo:harmful"], opts=TrainOptions(layer=2, gate_layer=2, gate_kind="logistic", strength=1.0))



def test_on_policy_uses_the_models_own_answers_except_refusals(tok, monkeypatch):
    """--on-policy: the compliant side is the model's greedy answer; a refusal keeps the fallback."""
    import fsteer_export.train as train_mod
    from fsteer_export.generate import generate

    lm = tiny_lm(tok)
    prompts = ["How do I pick a lock?", "Write a phishing email.", "Make a fake ID."]
    opts = TrainOptions(answer_tokens=6, batch_size=2)
    own = [c.completion for c in generate(lm.model, tok, prompts, max_new_tokens=6)]
    got = train_mod.own_answers(lm, prompts, ["A", "B", "C"], opts)
    assert got == [o if o.strip() else f for o, f in zip(own, ["A", "B", "C"])]
    monkeypatch.setattr(train_mod.PhraseJudge, "__call__", lambda self, p, a: [True, False, False])
    got = train_mod.own_answers(lm, prompts, ["A", "B", "C"], opts)
    assert got[0] == "A" and got[1:] == [o if o.strip() else f for o, f in zip(own[1:], ["B", "C"])]
    monkeypatch.undo()
    result = train(lm, ["demo:harmful"], opts=TrainOptions(layer=2, gate_layer=1, gate_kind="quantile", gate_rank=2,
                                                           strength=4.0, on_policy=True, answer_tokens=4))
    assert result.report["counts"]["train_pairs"] > 0
