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
        rank = int((share < variance).sum().item()) + 1
    rank = max(1, min(rank, max_rank, vh.shape[0]))
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
        from sklearn.linear_model import LogisticRegression

        with torch.no_grad():
            s_tr, p_tr = gate.project(ir_train)
            s_neg, p_neg = gate.project(negatives)
        feats = torch.cat([torch.cat([s_tr[:, None], p_tr], 1), torch.cat([s_neg[:, None], p_neg], 1)])
        labels = np.r_[np.ones(len(s_tr)), np.zeros(len(s_neg))]
        clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced", random_state=seed)
        clf.fit(feats.double().numpy(), labels)
        gate.weights.copy_(torch.from_numpy(clf.coef_[0]).float())
        gate.bias.fill_(float(clf.intercept_[0]))
        # Ramp: zero up to the 99th percentile of the negatives' probability (so clear negatives
        # get an exact 0 and their outputs stay byte-identical), full strength from the
        # calibration IR prompts' eps-quantile.
        with torch.no_grad():
            prob_cal = gate.score(ir_calib)
            prob_neg = gate.score(negatives)
        lo = float(torch.quantile(prob_neg.double(), 0.99))
        hi = max(float(torch.quantile(prob_cal.double(), eps)), lo + 0.02)
        gate.lo.fill_(lo)
        gate.hi.fill_(min(hi, 1.0) if hi > lo else lo + 1e-3)
    if not torch.isfinite(gate.basis).all() or not math.isfinite(float(gate.calib_scores.sum())):
        raise FSteerError("SCS fit produced non-finite values", "check the activations for NaN/Inf")
    return gate
