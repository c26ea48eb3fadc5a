"""Baselines on the same activations, layer and data as FineSteer (DESIGN §2.4).

Each baseline is a head with FineSteer's interface — ``(h_gate, h_q) → (g, v)`` plus
``strength`` and ``gate_layer`` — so it runs inside the same :class:`SteeringLayer` and the
comparison differs only in *when* and *how* the vector is chosen.
"""

from __future__ import annotations

import torch
from sklearn.metrics import roc_curve
from torch import nn

from .steering import FineSteerHead, steering_context, wrap_layer

METHODS = ("none", "finesteer", "caa", "rv", "cast", "mose-only", "scs-only")


class VectorHead(nn.Module):
    """A fixed vector behind an optional gate (None: always on)."""

    def __init__(self, vector: torch.Tensor, gate: nn.Module | None, gate_layer: int, strength: float = 1.0,
                 gate_pool: str = "last") -> None:
        super().__init__()
        self.register_buffer("vector", vector.float().clone())
        self.gate = gate
        self.gate_layer = gate_layer
        self.gate_pool = gate_pool
        self.strength = strength

    def forward(self, h_gate: torch.Tensor, h_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gate(h_gate) if self.gate is not None else torch.ones(h_gate.shape[0], device=h_gate.device)
        return g, self.vector.expand(h_q.shape[0], -1)


class MoseOnlyHead(nn.Module):
    """FineSteer without the gate (ablation): MoSE's vector on every prompt."""

    def __init__(self, head: FineSteerHead) -> None:
        super().__init__()
        self.mose = head.mose
        self.gate_layer = head.gate_layer
        self.gate_pool = head.gate_pool
        self.strength = head.strength

    def forward(self, h_gate: torch.Tensor, h_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(h_q.shape[0], device=h_q.device), self.mose(h_q)


class CosineGate(nn.Module):
    """CAST-style condition: fire (g = 1) when cos(h, condition direction) ≥ θ, else 0."""

    def __init__(self, direction: torch.Tensor, threshold: float, centre: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("direction", direction.float() / direction.float().norm().clamp_min(1e-12))
        self.register_buffer("centre", centre.float())
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def score(self, h: torch.Tensor) -> torch.Tensor:
        z = h.float() - self.centre
        return (z @ self.direction) / z.norm(dim=-1).clamp_min(1e-12)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (self.score(h) >= self.threshold).float()


def fit_cast_gate(harmful: torch.Tensor, benign: torch.Tensor) -> CosineGate:
    """Direction = mean(harmful) − mean(benign); θ maximises TPR − FPR (Youden) on the fit data."""
    centre = (harmful.mean(0) + benign.mean(0)) / 2
    gate = CosineGate(harmful.mean(0) - benign.mean(0), 0.0, centre)
    with torch.no_grad():
        scores = torch.cat([gate.score(harmful), gate.score(benign)]).numpy()
    labels = [1] * len(harmful) + [0] * len(benign)
    fpr, tpr, thr = roc_curve(labels, scores)
    best = int((tpr - fpr).argmax())
    gate.threshold.fill_(float(min(thr[best], 1.0)))
    return gate


def build_heads(finesteer: FineSteerHead, acts: dict[str, torch.Tensor], methods=METHODS) -> dict[str, nn.Module]:
    """The comparison set, from FineSteer's head and the cached training activations (gated
    baselines read the gate input the way FineSteer's gate does: same layer, same pooling)."""
    g_layer, pool = finesteer.gate_layer, finesteer.gate_pool
    mean_delta = acts["train_delta"].mean(0)
    out: dict[str, nn.Module] = {}
    for m in methods:
        if m == "finesteer":
            out[m] = finesteer
        elif m == "caa":
            out[m] = VectorHead(mean_delta, None, g_layer)
        elif m == "rv":
            if "general_h_layer" not in acts:
                continue  # needs harmless prompts
            out[m] = VectorHead(acts["train_h_layer"].mean(0) - acts["general_h_layer"].mean(0), None, g_layer)
        elif m == "scs-only":
            out[m] = VectorHead(mean_delta, finesteer.gate, g_layer, gate_pool=pool)
        elif m == "mose-only":
            out[m] = MoseOnlyHead(finesteer)
        elif m == "cast":
            if "general_h_gate" not in acts:
                continue
            out[m] = VectorHead(mean_delta, fit_cast_gate(acts["train_h_gate"], acts["general_h_gate"]), g_layer,
                                gate_pool=pool)
    return out


def install(model: nn.Module, name: str, head: nn.Module, layer: int) -> None:
    """Put any head into the model's steering layer L (and a gate tap at G < L), active alone."""
    wrapper = wrap_layer(model, layer)
    wrapper.fsteer[name] = head
    if head.gate_layer != layer:
        tap = wrap_layer(model, head.gate_layer)
        if name not in tap.taps:
            tap.taps.append(name)
        tap.set_adapter([name])
    wrapper.set_adapter([name])
    steering_context(model).reset()
