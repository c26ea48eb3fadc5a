"""SCS — Subspace-guided Conditional Steering: decides *when* to steer (DESIGN §2.2).

One-class: fitted on IR (intervention-requiring) prompt states only. The score is the share of a
centred state's energy that lies in the IR subspace; the gate compares it with the empirical
distribution of held-out IR calibration scores. Everything here is plain torch so the same
module runs eagerly, inside PEFT and inside the ONNX graph.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .errors import FSteerError

GATE_KINDS = ("quantile", "logistic", "soft")


def subspace_basis(states: torch.Tensor, rank: int | None = None, variance: float = 0.9,
                   max_rank: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and top principal directions ``V`` (d×r) of ``states`` (n×d), via torch SVD."""
    x = states.double()
    mu = x.mean(0)
    _, sv, vh = torch.linalg.svd(x - mu, full_matrices=False)
    if rank is None:
        share = (sv**2).cumsum(0) / (sv**2).sum().clamp_min(1e-30)
        rank = min(int((share < variance).sum().item()) + 1, max_rank)
    rank = max(1, min(rank, vh.shape[0]))
    return mu.float(), vh[:rank].T.contiguous().float()


class SubspaceGate(nn.Module):
    """g(ĥ) ∈ [0, 1]. Buffers only (nothing here is trained by gradient)."""

    def __init__(self, hidden: int, rank: int, n_calib: int, kind: str = "quantile") -> None:
        super().__init__()
        if kind not in GATE_KINDS:
            raise FSteerError(f"unknown gate kind {kind!r}", f"use one of {', '.join(GATE_KINDS)}")
        self.kind = kind
        self.register_buffer("mu", torch.zeros(hidden))
        self.register_buffer("basis", torch.zeros(hidden, rank))
        self.register_buffer("calib_scores", torch.zeros(n_calib))
        # quantile: eps, gamma. soft: lo, hi on s. logistic: weights on [s, projection], bias,
        # and a ramp lo..hi on the probability so that clear negatives give an exact 0.
        self.register_buffer("eps", torch.tensor(0.05))
        self.register_buffer("gamma", torch.tensor(8.0))
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(1.0))
        self.register_buffer("weights", torch.zeros(rank + 1))
        self.register_buffer("bias", torch.tensor(0.0))

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energy ratio s (B,) and subspace coordinates (B, r) of states h (B, d)."""
        z = h.float() - self.mu
        p = z @ self.basis
        s = (p * p).sum(-1) / (z * z).sum(-1).clamp_min(1e-12)
        return s, p

    def cdf(self, s: torch.Tensor) -> torch.Tensor:
        """F(s) = share of calibration scores ≤ s; written without sorting so ONNX can run it."""
        return (s[:, None] >= self.calib_scores[None, :]).float().mean(-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s, p = self.project(h)
        if self.kind == "quantile":
            f = self.cdf(s)
            return torch.where(f >= self.eps, torch.ones_like(f), (f / self.eps).clamp(0, 1) ** self.gamma)
        if self.kind == "soft":
            return ((s - self.lo) / (self.hi - self.lo).clamp_min(1e-6)).clamp(0.0, 1.0)
        logit = s * self.weights[0] + p @ self.weights[1:] + self.bias
        prob = torch.sigmoid(logit)
        return ((prob - self.lo) / (self.hi - self.lo).clamp_min(1e-6)).clamp(0.0, 1.0)

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """The continuous detection score behind the gate (for ROC curves and plots)."""
        s, p = self.project(h)
        if self.kind == "logistic":
            return torch.sigmoid(s * self.weights[0] + p @ self.weights[1:] + self.bias)
        return s


def fit_logistic(gate: SubspaceGate, positives: torch.Tensor, negatives: torch.Tensor, *,
                 seed: int = 0, c: float = 0.1, margin: float = 0.05) -> None:
    """Logistic gate on the subspace features [s, Vᵀ(h − μ)] of a gate whose μ, V are already set.

    Why this recipe (measured on SmolLM2, bench/RESULTS.md): the classifier sees every IR prompt
    (training + calibration), while the subspace stays fitted on the training ones only, so the
    calibration prompts show it what an unseen IR prompt's energy ratio looks like; features are
    standardized (folded back into weights and bias, so the runtime formula is unchanged); the
    ramp's zero point is the 99th percentile of the negatives' *out-of-fold* probabilities —
    in-sample probabilities are optimistic and let benign look-alikes through.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    with torch.no_grad():
        feats = torch.cat([torch.cat([s[:, None], p], 1) for s, p in (gate.project(positives), gate.project(negatives))])
    x = feats.double().numpy()
    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    centre, scale = x.mean(0), x.std(0) + 1e-9
    xs = (x - centre) / scale
    clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced", random_state=seed)
    folds = min(5, int(y.sum()), int((1 - y).sum()))
    oof = cross_val_predict(clf, xs, y, method="predict_proba",
                            cv=StratifiedKFold(folds, shuffle=True, random_state=seed))[:, 1]
    clf.fit(xs, y)
    w = clf.coef_[0] / scale
    gate.weights.copy_(torch.from_numpy(w).float())
    gate.bias.fill_(float(clf.intercept_[0] - (w * centre).sum()))
    lo = min(float(np.quantile(oof[y == 0], 0.99)), 1.0 - margin)
    gate.lo.fill_(lo)
    gate.hi.fill_(lo + margin)


def fit_gate(ir_train: torch.Tensor, ir_calib: torch.Tensor, *, kind: str = "quantile",
             rank: int | None = None, eps: float = 0.05, gamma: float = 8.0,
             negatives: torch.Tensor | None = None, seed: int = 0) -> SubspaceGate:
    """Fit μ, V on ``ir_train``; calibrate on held-out ``ir_calib`` (and ``negatives`` for logistic)."""
    if ir_train.shape[0] < 2 or ir_calib.shape[0] < 1:
        raise FSteerError(f"SCS needs at least 2 training and 1 calibration prompts, got "
                          f"{ir_train.shape[0]} and {ir_calib.shape[0]}", "provide more IR prompts")
    mu, basis = subspace_basis(ir_train, rank=rank)
    gate = SubspaceGate(ir_train.shape[1], basis.shape[1], ir_calib.shape[0], kind=kind)
    gate.mu.copy_(mu)
    gate.basis.copy_(basis)
    with torch.no_grad():
        s_cal, p_cal = gate.project(ir_calib)
    gate.calib_scores.copy_(torch.sort(s_cal).values)
    gate.eps.fill_(eps)
    gate.gamma.fill_(gamma)
    if kind == "soft":
        s_tr, _ = gate.project(ir_train)
        gate.lo.fill_(float(torch.quantile(s_cal, eps)) * 0.5)
        gate.hi.fill_(float(torch.quantile(s_cal, eps)))
    elif kind == "logistic":
        if negatives is None or negatives.shape[0] < 2:
            raise FSteerError("the logistic gate needs general (benign) prompts as negatives",
                              "pass --general PATH or use --gate quantile")
        fit_logistic(gate, torch.cat([ir_train, ir_calib]), negatives, seed=seed)
    if not torch.isfinite(gate.basis).all() or not math.isfinite(float(gate.calib_scores.sum())):
        raise FSteerError("SCS fit produced non-finite values", "check the activations for NaN/Inf")
    return gate
