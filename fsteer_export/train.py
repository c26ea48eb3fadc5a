"""The training pipeline: data → activations → SCS + MoSE → λ, with choices made on validation.

Splits (seeded): IR prompts → train (MoSE pairs, SCS subspace) / calibration (the gate's
empirical CDF) / validation (gate TPR, λ). General prompts, when given, → gate negatives (the
logistic gate) / validation (the gate's false-positive rate).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .activations import cache_key, cached, pair_activations, prompt_features
from .config import GATE_POOLS, FineSteerConfig
from .data import (Pair, compliant_answers, demo_prompts, load_many, safety_pairs, split, target_prefixes,
                   truthfulqa_pairs)
from .errors import FSteerError
from .eval.judge import PhraseJudge
from .generate import generate
from .models import LoadedModel, check_layer, hidden_size, model_type, num_layers
from .mose import fit_mose
from .progress import status
from .scs import SubspaceGate, fit_gate
from .steering import FineSteerHead, add_adapter, remove_steering

TASKS = ("safety", "truthfulqa")
MIN_PROMPTS = 12


@dataclass
class TrainOptions:
    task: str = "safety"
    layer: int | None = None  # default: 40 % of depth (measured best on SmolLM2, see bench/RESULTS.md)
    gate_layer: int | None = None  # default: chosen on validation among layers ≤ L
    experts: int | None = None  # default: Calinski–Harabasz over 2..10
    strength: float | None = None  # default: chosen on validation (safety) or 1.0 (truthfulqa)
    gate_kind: str | None = None  # default: logistic with --general, else quantile
    gate_rank: int | None = None  # default: chosen on validation from (8, 16, 32)
    gate_pool: str | None = None  # default: chosen on validation between "last" and "mean"
    eps: float = 0.05
    seed: int = 0
    batch_size: int = 32
    max_prompts: int = 600
    answer_tokens: int = 32
    strengths: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # λ search grid (walked from 1.0)
    val_generations: int = 24
    borderline: bool = True  # add the built-in borderline-safe prompts to the gate's negatives
    on_policy: bool = False  # compliant side = the model's own greedy answer (costs one generation pass)
    use_cache: bool = True
    prompt_column: str | None = None


@dataclass
class TrainResult:
    config: FineSteerConfig
    head: FineSteerHead
    report: dict = field(default_factory=dict)
    # What baselines and evaluation reuse: train states/δ at L, gate-layer states, general states.
    activations: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def model_fingerprint(model: nn.Module) -> str:
    """Cheap identity of the weights, so two models with the same name never share a cache entry."""
    import hashlib
    h = hashlib.sha256()
    params = list(model.parameters())
    for p in (params[0], params[len(params) // 2], params[-1]):
        h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def default_layer(n_layers: int) -> int:
    return max(0, min(n_layers - 1, round(0.4 * n_layers)))


def gate_candidates(layer: int, n_layers: int) -> list[int]:
    step = max(1, n_layers // 15)
    cands = sorted({max(0, layer - k * step) for k in range(4)})
    return cands


def gate_ranks(kind: str, hidden: int) -> list[int]:
    """Subspace ranks tried on validation. The logistic gate gains from a wide subspace (measured:
    rank 128 beats 32 on held-out TPR at equal FPR on SmolLM2); the cap 2^18/d keeps the adapter
    under 5 MB at d = 4096. The one-class gate needs a tight subspace."""
    if kind == "logistic":
        cap = max(32, min(128, 2**18 // hidden))
        return [r for r in (32, 64, 128) if r <= cap]
    return [8, 16, 32]


def _rates(gate: SubspaceGate, pos: torch.Tensor, neg: torch.Tensor | None) -> tuple[float, float]:
    with torch.no_grad():
        tpr = float((gate(pos) >= 0.5).float().mean())
        fpr = float((gate(neg) > 0).float().mean()) if neg is not None and len(neg) else 0.0
    return tpr, fpr


States = dict[str, dict[int, torch.Tensor]]  # pool ("last" | "mean") → layer → (n, d)


def choose_gate(train_states: States, calib: States, val_pos: States, neg_train: States | None,
                neg_val: States | None, layers: Sequence[int], opts: TrainOptions):
    """Best (G, pool, kind, rank) by TPR on held-out IR prompts minus 2×FPR on held-out general ones.

    Ties go to the mean-pooled input, then the deeper layer: on SmolLM2, trained on AdvBench-style
    requests, the mean-pooled gate fires on 55 % of question-style harmful prompts, the last-token
    one on 14 %, at about the same false-positive rate (bench/RESULTS.md)."""
    kinds = [opts.gate_kind] if opts.gate_kind else (["logistic", "quantile"] if neg_train else ["quantile"])
    pools = [opts.gate_pool] if opts.gate_pool else list(GATE_POOLS)
    trials = []
    for pool in pools:
        for g_layer in layers:
            for kind in kinds:
                for rank in [opts.gate_rank] if opts.gate_rank else gate_ranks(kind, train_states[pool][g_layer].shape[1]):
                    if rank >= train_states[pool][g_layer].shape[0]:
                        continue
                    gate = fit_gate(train_states[pool][g_layer], calib[pool][g_layer], kind=kind, rank=rank,
                                    eps=opts.eps, negatives=neg_train[pool][g_layer] if neg_train else None,
                                    seed=opts.seed)
                    tpr, fpr = _rates(gate, val_pos[pool][g_layer], neg_val[pool][g_layer] if neg_val else None)
                    trials.append({"gate_layer": g_layer, "pool": pool, "kind": kind, "rank": gate.rank, "tpr": tpr,
                                   "fpr": fpr, "score": tpr - 2 * fpr, "gate": gate})
    if not trials:
        raise FSteerError("too few IR prompts to fit the gate", f"provide at least {MIN_PROMPTS} prompts")
    best = max(trials, key=lambda t: (round(t["score"], 6), t["pool"] == "mean", t["gate_layer"]))
    return best, [{k: v for k, v in t.items() if k != "gate"} for t in trials]


def _flat(states: States) -> dict[str, torch.Tensor]:
    """{pool: {layer: t}} → {"pool.hL": t}: the activation cache stores flat safetensors."""
    return {f"{p}.h{l}": t for p, by_layer in states.items() for l, t in by_layer.items()}


def choose_strength(lm: LoadedModel, head: FineSteerHead, probe: Sequence[str], opts: TrainOptions) -> list[dict]:
    """Walk the λ grid from 1.0: down while validation refusal holds, up while it improves."""
    judge = PhraseJudge()
    grid = sorted(opts.strengths)
    results: dict[float, float] = {}

    def rate(lam: float) -> float:
        if lam not in results:
            head.strength = lam
            outs = generate(lm.model, lm.tokenizer, probe, max_new_tokens=24, batch_size=opts.batch_size,
                            use_cache=opts.use_cache, desc=f"validating λ={lam}")
            flags = judge(probe, [o.completion for o in outs])
            results[lam] = sum(flags) / max(1, len(flags))
        return results[lam]

    start = min(range(len(grid)), key=lambda i: abs(grid[i] - 1.0))
    r0 = rate(grid[start])
    if r0 >= 0.9:
        for i in range(start - 1, -1, -1):
            if rate(grid[i]) < r0 - 0.05:
                break
    else:
        best = r0
        for i in range(start + 1, len(grid)):
            r = rate(grid[i])
            if r <= best:
                break
            best = r
        if best == r0 and start > 0:
            rate(grid[start - 1])
    return [{"strength": k, "val_refusal": v} for k, v in sorted(results.items())]


def own_answers(lm: LoadedModel, prompts: Sequence[str], fallback: Sequence[str], opts: TrainOptions) -> list[str]:
    """The unsteered model's own greedy answers as the compliant side (DESIGN §2.1: δ then measures
    what the model actually does, not a data set's canned target). Where the model already refuses,
    the fallback answer is kept, so the pair still contrasts refusal with compliance."""
    outs = generate(lm.model, lm.tokenizer, list(prompts), max_new_tokens=opts.answer_tokens,
                    batch_size=opts.batch_size, use_cache=opts.use_cache, desc="model's own answers")
    refused = PhraseJudge()(list(prompts), [o.completion for o in outs])
    return [f if r or not o.completion.strip() else o.completion for o, f, r in zip(outs, fallback, refused)]


def _load_task_data(task: str, data: Sequence[str], opts: TrainOptions):
    if task == "safety":
        prompts = load_many(list(data), opts.prompt_column)
        targets: dict[str, str] = {}
        for path in data:
            targets.update(target_prefixes(path))
        return prompts, targets
    pairs: list[Pair] = []
    for path in data:
        pairs.extend(truthfulqa_pairs(path, seed=opts.seed))
    return pairs, {}


def train(lm: LoadedModel, data: Sequence[str], general: Sequence[str] = (),
          opts: TrainOptions | None = None, examples: list | None = None) -> TrainResult:
    """Fit a FineSteer adapter; returns its config, head and a report of every choice made."""
    opts = opts or TrainOptions()
    if opts.task not in TASKS:
        raise FSteerError(f"unknown task {opts.task!r}", f"use one of {', '.join(TASKS)}")
    if not data and examples is None:
        raise FSteerError("no training data given", "pass --data PATH (repeatable)")
    if opts.gate_pool is not None and opts.gate_pool not in GATE_POOLS:
        raise FSteerError(f"unknown gate pooling {opts.gate_pool!r}", f"use --gate-pool {' or '.join(GATE_POOLS)}")
    model, tok = lm.model, lm.tokenizer
    remove_steering(model)
    n_layers = num_layers(model)
    layer = check_layer(model, opts.layer if opts.layer is not None else default_layer(n_layers))
    if opts.gate_layer is not None:
        check_layer(model, opts.gate_layer, "--gate-layer")
        if opts.gate_layer > layer:
            raise FSteerError(f"--gate-layer {opts.gate_layer} is after --layer {layer}",
                              "the gate must read a layer G ≤ L (it is computed before L's output changes)")
        g_layers = [opts.gate_layer]
    else:
        g_layers = gate_candidates(layer, n_layers)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    rng = random.Random(opts.seed)

    # -- data -------------------------------------------------------------------------
    items, targets = (list(examples), {}) if examples is not None else _load_task_data(opts.task, data, opts)
    if len(items) > opts.max_prompts:
        items = rng.sample(items, opts.max_prompts)
    if len(items) < MIN_PROMPTS:
        raise FSteerError(f"only {len(items)} usable examples after removing duplicates; training needs at least {MIN_PROMPTS}",
                          "add more prompts to --data")
    tr, cal, val = split(items, (0.6, 0.2, 0.2), seed=opts.seed)
    if opts.experts is not None and opts.experts > len(tr):
        raise FSteerError(f"--experts {opts.experts} is larger than the number of training examples ({len(tr)} "
                          f"of {len(items)} go to training)", f"use --experts ≤ {len(tr)} or add data")
    if opts.task == "safety":
        compliant = compliant_answers(tr, targets, opts.seed)
        if opts.on_policy:
            compliant = own_answers(lm, tr, compliant, opts)
        pairs = safety_pairs(tr, compliant, seed=opts.seed)
        cal_prompts, val_prompts = cal, val
    else:
        pairs = tr
        cal_prompts, val_prompts = [p.prompt for p in cal], [p.prompt for p in val]
    gen_prompts: list[str] = []
    if general:
        gen_prompts = load_many(list(general), opts.prompt_column)
        gen_prompts = [p for p in gen_prompts if p not in set(cal_prompts) | set(val_prompts) | {q.prompt for q in pairs}]
        gen_prompts = rng.sample(gen_prompts, min(len(gen_prompts), 400))
    gen_train, gen_val = split(gen_prompts, (0.5, 0.5), seed=opts.seed) if gen_prompts else ([], [])
    if gen_prompts and opts.borderline and opts.task == "safety":
        # Borderline-safe prompts ("how do I kill a Python process") are what a one-class or
        # Alpaca-only gate gets wrong; the project's own set teaches the gate to leave them alone.
        b_train, b_val = split(demo_prompts("borderline"), (0.5, 0.5), seed=opts.seed)
        gen_train, gen_val = gen_train + b_train, gen_val + b_val
    timings["data"] = time.perf_counter() - t0

    # -- activations (cached) -----------------------------------------------------------
    t1 = time.perf_counter()
    p_layers = sorted(set(g_layers) | {layer})
    fp = model_fingerprint(model)
    key = cache_key("pairs", lm.name, fp, model_type(model), hidden_size(model), p_layers, layer,
                    [(p.prompt, p.positive, p.negative) for p in pairs], opts.answer_tokens)

    def compute_pairs():
        states, deltas = pair_activations(model, tok, pairs, p_layers, [layer], batch_size=opts.batch_size,
                                          max_answer_tokens=opts.answer_tokens)
        return {**_flat(states), "delta": deltas[layer]}

    with status(f"extracting activations for {len(pairs)} pairs (layers {p_layers})"):
        pair_t = cached(key, compute_pairs)
    extra = cal_prompts + val_prompts + gen_train + gen_val
    key2 = cache_key("prompts", lm.name, fp, model_type(model), hidden_size(model), p_layers, extra)
    with status(f"extracting prompt states for {len(extra)} prompts"):
        prm_t = cached(key2, lambda: _flat(prompt_features(model, tok, extra, p_layers, batch_size=opts.batch_size)))
    timings["activations"] = time.perf_counter() - t1
    sizes = [len(cal_prompts), len(val_prompts), len(gen_train), len(gen_val)]
    bounds = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
    part = lambda i: {p: {l: prm_t[f"{p}.h{l}"][bounds[i]:bounds[i + 1]] for l in p_layers}  # noqa: E731
                      for p in GATE_POOLS}
    calib, val_pos, neg_tr, neg_val = part(0), part(1), part(2), part(3)
    train_states = {p: {l: pair_t[f"{p}.h{l}"] for l in p_layers} for p in GATE_POOLS}

    # -- SCS --------------------------------------------------------------------------
    t2 = time.perf_counter()
    best, trials = choose_gate(train_states, calib, val_pos, neg_tr if gen_train else None,
                               neg_val if gen_val else None, g_layers, opts)
    gate: SubspaceGate = best["gate"]
    g_pool, g_layer = best["pool"], best["gate_layer"]
    timings["scs"] = time.perf_counter() - t2

    # -- MoSE -------------------------------------------------------------------------
    t3 = time.perf_counter()
    fit = fit_mose(train_states["last"][layer], pair_t["delta"], experts=opts.experts, seed=opts.seed)
    timings["mose"] = time.perf_counter() - t3

    cfg = FineSteerConfig(
        base_model_name_or_path=lm.name, layer=layer, gate_layer=g_layer, hidden_size=hidden_size(model),
        gate_kind=gate.kind, gate_pool=g_pool, gate_rank=gate.rank, calib_size=gate.calib_scores.shape[0],
        experts=fit.module.num_experts, residual_rank=fit.module.residual_basis.shape[1],
        key_dim=fit.module.query.out_features, mlp_hidden=fit.module.residual[0].out_features,
        strength=opts.strength if opts.strength is not None else 1.0, task=opts.task,
        base_model_type=model_type(model), base_num_layers=n_layers)
    head_state = {**{f"gate.{k}": v for k, v in gate.state_dict().items()},
                  **{f"mose.{k}": v for k, v in fit.module.state_dict().items()}}

    # -- λ ----------------------------------------------------------------------------
    t4 = time.perf_counter()
    lam_trials: list[dict] = []
    head = add_adapter(model, cfg, state=head_state)
    try:
        if opts.strength is None and opts.task == "safety":
            lam_trials = choose_strength(lm, head, val_prompts[: opts.val_generations], opts)
            top = max(t["val_refusal"] for t in lam_trials)
            cfg.strength = min(t["strength"] for t in lam_trials if t["val_refusal"] >= top - 0.05)
        head.strength = cfg.strength
    finally:
        remove_steering(model)
    timings["strength"] = time.perf_counter() - t4
    timings["total"] = time.perf_counter() - t0

    with torch.no_grad():
        gen_scores = {"val_ir": gate.score(val_pos[g_pool][g_layer]).tolist(),
                      "val_general": gate.score(neg_val[g_pool][g_layer]).tolist() if gen_val else [],
                      "calibration": gate.score(calib[g_pool][g_layer]).tolist()}
        usage = fit.module.routing(train_states["last"][layer]).mean(0).tolist()
    report = {
        "task": opts.task, "seed": opts.seed, "layer": layer, "gate_layer": g_layer, "gate_pool": g_pool,
        "gate_kind": gate.kind, "gate_rank": gate.rank, "eps": opts.eps, "strength": cfg.strength,
        "experts": fit.module.num_experts, "residual_rank": cfg.residual_rank,
        "counts": {"train_pairs": len(pairs), "calibration": len(cal_prompts), "validation": len(val_prompts),
                   "general_train": len(gen_train), "general_validation": len(gen_val)},
        "gate_validation": {"tpr": best["tpr"], "fpr_general": best["fpr"] if gen_val else None},
        "gate_trials": trials, "strength_trials": lam_trials,
        "mose": {"train_loss": fit.train_loss, "val_loss": fit.val_loss, "mean_vector_val_loss": fit.baseline_val_loss,
                 "epochs": fit.epochs, "expert_usage": usage},
        "gate_scores": gen_scores,
        "gate_thresholds": {"lo": float(gate.lo), "hi": float(gate.hi)} if gate.kind != "quantile" else
                           {"eps": opts.eps, "calibration_min": float(gate.calib_scores.min())},
        "validation_prompts": val_prompts[: opts.val_generations],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    cfg.training = {k: report[k] for k in ("counts", "gate_validation")} | {  # no timings: same seed ⇒ same bytes
        "strength_trials": lam_trials, "mose_val_loss": round(fit.val_loss, 6)}
    final = FineSteerHead(cfg)
    final.load_state_dict(head_state)
    final.eval()
    acts = {"train_h_gate": train_states[g_pool][g_layer], "train_h_layer": train_states["last"][layer],
            "train_delta": pair_t["delta"], "calib_h_gate": calib[g_pool][g_layer],
            "val_h_gate": val_pos[g_pool][g_layer]}
    if gen_train:
        acts.update(general_h_gate=neg_tr[g_pool][g_layer], general_h_layer=neg_tr["last"][layer])
    return TrainResult(cfg, final, report, acts)
