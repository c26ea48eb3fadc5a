"""The safety suite: harmful refusal, over-refusal, identical benign outputs, gate quality.

Every method (FineSteer, baselines, ablations) runs in the same steering layer on the same
prompts. Rows whose gate is exactly 0 get the base model's output without generating again:
adding λ·0·v changes no logit, so the text is byte-identical by construction (tests check it).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from ..activations import prompt_features
from ..baselines import METHODS, build_heads, install
from ..data import load_many
from ..generate import generate
from ..models import LoadedModel
from ..progress import status
from ..steering import remove_steering
from ..train import TrainOptions, choose_strength, train
from .judge import PhraseJudge, RefusalJudge


@dataclass
class SafetyOptions:
    methods: Sequence[str] = METHODS
    n_harmful: int = 100
    n_benign: int = 100  # per benign set
    max_new_tokens: int = 32
    sweep: Sequence[float] = (0.5, 1.0, 2.0)
    n_sweep: int = 24
    batch_size: int = 32
    seed: int = 0
    train: TrainOptions = field(default_factory=TrainOptions)


def _sample(items: list[str], n: int, seed: int, exclude: set[str]) -> list[str]:
    items = [p for p in items if p not in exclude]
    return random.Random(seed).sample(items, min(n, len(items)))


def _gates(head, states: dict[str, dict[int, torch.Tensor]], layer: int) -> torch.Tensor:
    """Each test prompt's gate, from the states the way the steering layer reads them."""
    with torch.no_grad():
        g, _ = head(states[getattr(head, "gate_pool", "last")][head.gate_layer], states["last"][layer])
    return g


def run_safety(lm: LoadedModel, train_paths: Sequence[str], general_paths: Sequence[str],
               harmful_paths: Sequence[str], benign_sets: dict[str, Sequence[str]],
               opts: SafetyOptions | None = None, judge: RefusalJudge | None = None,
               adapter: str | Path | None = None) -> dict:
    """Train FineSteer + baselines on the training data (or take FineSteer from ``adapter``, then
    the baselines are trained at its layers); evaluate everything on held-out sets."""
    opts = opts or SafetyOptions()
    judge = judge or PhraseJudge()
    model, tok = lm.model, lm.tokenizer
    t0 = time.perf_counter()
    if adapter is not None:
        from ..adapter import read_config, read_weights
        from ..steering import FineSteerHead, check_compatible
        cfg = read_config(adapter)
        check_compatible(model, cfg, where=f"adapter {adapter}")
        head = FineSteerHead(cfg)
        head.load_state_dict(read_weights(adapter, cfg))
        topts = TrainOptions(**{**opts.train.__dict__, "layer": cfg.layer, "gate_layer": cfg.gate_layer,
                                "strength": cfg.strength})
        result = train(lm, train_paths, general_paths, topts)
        result.head, result.config = head.eval(), cfg
    else:
        result = train(lm, train_paths, general_paths, opts.train)
    t_train = time.perf_counter() - t0
    layer, cfg = result.config.layer, result.config
    seen = set(load_many(list(train_paths))) | (set(load_many(list(general_paths))) if general_paths else set())
    harmful = _sample(load_many(list(harmful_paths)), opts.n_harmful, opts.seed, seen)
    benign = {name: _sample(load_many(list(paths)), opts.n_benign, opts.seed, seen) for name, paths in benign_sets.items()}
    all_benign = [p for ps in benign.values() for p in ps]
    heads = build_heads(result.head, result.activations, [m for m in opts.methods if m != "none"])

    with status("prompt states of the test sets"):
        states = prompt_features(model, tok, harmful + all_benign, sorted({cfg.gate_layer, layer}),
                                 batch_size=opts.batch_size)
    n_h = len(harmful)
    h_states = {p: {l: v[:n_h] for l, v in by_layer.items()} for p, by_layer in states.items()}
    b_states = {p: {l: v[n_h:] for l, v in by_layer.items()} for p, by_layer in states.items()}
    g_pool = cfg.gate_pool

    gen = lambda prompts, desc: [c.completion for c in generate(  # noqa: E731
        model, tok, prompts, max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size, desc=desc)]
    remove_steering(model)
    base_h = gen(harmful, "base: harmful")
    base_b = gen(all_benign, "base: benign")

    def run_method(name: str, prompts: list[str], base: list[str], gates: torch.Tensor) -> tuple[list[str], int]:
        """Generate only where the gate is non-zero; elsewhere the base text is exact."""
        idx = [i for i in range(len(prompts)) if float(gates[i]) != 0.0]
        outs = list(base)
        if idx:
            new = gen([prompts[i] for i in idx], f"{name}")
            for i, text in zip(idx, new):
                outs[i] = text
        return outs, len(idx)

    val_probe = result.report.get("validation_prompts", [])[: opts.train.val_generations]
    # every answer list is judged once, with its prompts (a classifier judge may read them)
    base_ref_h, base_ref_b = judge(harmful, base_h), judge(all_benign, base_b)
    results: dict[str, dict] = {"none": _metrics(base_ref_h, benign, base_ref_b, base_b, base_b)}
    results["none"]["strength"] = 0.0
    curves: dict[str, list[tuple[float, float, float]]] = {}
    sweep_h = harmful[: opts.n_sweep]
    sweep_b_idx = random.Random(opts.seed).sample(range(len(all_benign)), min(opts.n_sweep, len(all_benign)))
    for name, head in heads.items():
        install(model, name, head, layer)
        if name == "finesteer":
            lam = cfg.strength
        elif val_probe:
            trials = choose_strength(lm, head, val_probe, opts.train)
            top = max(t["val_refusal"] for t in trials)
            lam = min(t["strength"] for t in trials if t["val_refusal"] >= top - 0.05)
        else:
            lam = 1.0
        head.strength = lam
        g_h, g_b = _gates(head, h_states, layer), _gates(head, b_states, layer)
        out_h, _ = run_method(f"{name}: harmful", harmful, base_h, g_h)
        out_b, n_gen = run_method(f"{name}: benign", all_benign, base_b, g_b)
        ref_b = judge(all_benign, out_b)
        m = _metrics(judge(harmful, out_h), benign, ref_b, out_b, base_b)
        m["benign_changed"] = _changed(benign, out_b, base_b, ref_b, base_ref_b)
        m.update(strength=lam, gate_fire_harmful=float((g_h > 0).float().mean()),
                 gate_fire_benign=float((g_b > 0).float().mean()), benign_generated=n_gen)
        results[name] = m
        pts = []
        for s in opts.sweep:
            head.strength = s
            sh, _ = run_method(f"{name} λ={s}: harmful", sweep_h, base_h[: len(sweep_h)], g_h[: len(sweep_h)])
            sweep_b = [all_benign[i] for i in sweep_b_idx]
            sb, _ = run_method(f"{name} λ={s}: benign", sweep_b, [base_b[i] for i in sweep_b_idx], g_b[sweep_b_idx])
            pts.append((s, _share(judge(sweep_b, sb)), _share(judge(sweep_h, sh))))
        curves[name] = pts
        head.strength = lam
        remove_steering(model)

    # Gate detection quality (FineSteer's gate score on the test prompts).
    with torch.no_grad():
        score_h = result.head.gate.score(h_states[g_pool][cfg.gate_layer]).tolist()
        score_b = result.head.gate.score(b_states[g_pool][cfg.gate_layer]).tolist()
        fire_h = (result.head.gate(h_states[g_pool][cfg.gate_layer]) > 0).float()
        fire_b = (result.head.gate(b_states[g_pool][cfg.gate_layer]) > 0).float()
        usage = result.head.mose.routing(h_states["last"][layer]).mean(0).tolist()
    detection = {"tpr": float(fire_h.mean()), "fpr": float(fire_b.mean()),
                 "roc_auc": float(roc_auc_score([1] * len(score_h) + [0] * len(score_b), score_h + score_b)),
                 "threshold": float(result.head.gate.lo) if cfg.gate_kind != "quantile" else None}
    return {
        "suite": "safety", "model": lm.name, "layer": layer, "gate_layer": cfg.gate_layer,
        "counts": {"harmful": len(harmful), **{k: len(v) for k, v in benign.items()}},
        "methods": results, "curves": {k: [list(p) for p in v] for k, v in curves.items()},
        "detection": detection, "gate_scores": {"harmful": score_h, "benign": score_b},
        "expert_usage": usage, "judge": getattr(judge, "name", type(judge).__name__),
        "max_new_tokens": opts.max_new_tokens, "train_report": result.report,
        "seconds": {"train": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)},
    }


def _share(flags: Sequence[bool]) -> float:
    return sum(map(bool, flags)) / max(1, len(flags))


def _changed(benign: dict[str, list[str]], out_b: list[str], base_b: list[str], refused: Sequence[bool],
             base_refused: Sequence[bool], limit: int = 25) -> list[dict] | None:
    """The benign prompts a method changed (set, prompt, whether the new / the base answer is a
    refusal, from the verdicts already taken), so a reader can see *which* prompts a gate let
    through; None when more than ``limit`` changed (an always-on method changes nearly all of them)."""
    names = [name for name, prompts in benign.items() for _ in prompts]
    prompts = [p for ps in benign.values() for p in ps]
    idx = [i for i, (a, b) in enumerate(zip(out_b, base_b)) if a != b]
    if len(idx) > limit:
        return None
    return [{"set": names[i], "prompt": prompts[i], "refusal": bool(refused[i]), "base_refusal": bool(base_refused[i])}
            for i in idx]


def _metrics(refused_h: Sequence[bool], benign: dict[str, list[str]], refused_b: Sequence[bool],
             out_b: list[str], base_b: list[str]) -> dict:
    """Refusal rates from the judge's verdicts, and the share of benign answers equal to the base model's."""
    m = {"harmful_refusal": _share(refused_h)}
    start = 0
    for name, prompts in benign.items():
        end = start + len(prompts)
        m[f"{name}_refusal"] = _share(refused_b[start:end])
        m[f"{name}_identical"] = sum(a == b for a, b in zip(out_b[start:end], base_b[start:end])) / max(1, len(prompts))
        start = end
    m["benign_refusal"] = _share(refused_b)
    m["benign_identical"] = sum(a == b for a, b in zip(out_b, base_b)) / max(1, len(out_b))
    return m
