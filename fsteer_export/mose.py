"""MoSE — Mixture of Steering Experts: decides *how* to steer (DESIGN §2.3).

v(ĥ) = C·α(ĥ) + U_res·β(ĥ): frozen prototype experts C from K-means on δ, a low-rank attention
router α (W_Q, W_K ∈ R^{d_k×d}, so the adapter stays a few MB even at d = 4096) and a residual
refinement in the top-k PCA basis of δ. Only W_Q, W_K and the β MLP are trained, on cached
activations, which takes seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import FSteerError


class MixtureOfSteeringExperts(nn.Module):
    def __init__(self, hidden: int, experts: int, residual_rank: int, key_dim: int = 64,
                 mlp_hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("experts", torch.zeros(hidden, experts))  # C (d×K), frozen
        self.register_buffer("residual_basis", torch.zeros(hidden, residual_rank))  # U_res, frozen
        self.register_buffer("in_mean", torch.zeros(hidden))  # input standardisation of ĥ
        self.register_buffer("in_scale", torch.ones(()))
        self.query = nn.Linear(hidden, key_dim, bias=False)  # W_Q
        self.key = nn.Linear(hidden, key_dim, bias=False)  # W_K (applied to the experts)
        self.residual = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(),
                                      nn.Linear(mlp_hidden, residual_rank))  # β

    @property
    def num_experts(self) -> int:
        return self.experts.shape[1]

    def routing(self, h: torch.Tensor) -> torch.Tensor:
        """α(ĥ): dense softmax weights over the K experts, (B, K)."""
        x = (h.float() - self.in_mean) / self.in_scale
        q = self.query(x)  # (B, dk)
        k = self.key((self.experts / self.experts.norm(dim=0).clamp_min(1e-6)).T)  # (K, dk)
        return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = (h.float() - self.in_mean) / self.in_scale
        alpha = self.routing(h)
        return alpha @ self.experts.T + self.residual(x) @ self.residual_basis.T


def choose_experts(deltas: torch.Tensor, k_range: range = range(2, 11), pca_dims: int = 256,
                   experts: int | None = None, seed: int = 0) -> tuple[np.ndarray, int]:
    """K-means labels on normalised δ (in a PCA-reduced space); K by Calinski–Harabasz unless given."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import calinski_harabasz_score

    n = deltas.shape[0]
    if experts is not None and experts > n:
        raise FSteerError(f"--experts {experts} is larger than the number of training examples ({n})",
                          f"use --experts ≤ {n} or add data")
    if experts is not None and experts < 1:
        raise FSteerError(f"--experts must be ≥ 1, got {experts}", "use a value like 4")
    x = deltas.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x = x - x.mean(0)
    dims = min(pca_dims, n - 1, x.shape[1])
    if dims >= 1:
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        x = x @ vh[:dims].T
    feats = x.numpy()
    if experts is not None:
        if experts == 1:
            return np.zeros(n, dtype=int), 1
        return KMeans(experts, n_init=10, random_state=seed).fit_predict(feats), experts
    best = (-1.0, None, 1)
    for k in k_range:
        if k >= n:
            break
        labels = KMeans(k, n_init=10, random_state=seed).fit_predict(feats)
        if len(set(labels)) < 2:
            continue
        score = calinski_harabasz_score(feats, labels)
        if score > best[0]:
            best = (score, labels, k)
    if best[1] is None:
        return np.zeros(n, dtype=int), 1
    return best[1], best[2]


@dataclass
class MoseFit:
    module: MixtureOfSteeringExperts
    train_loss: float
    val_loss: float
    epochs: int
    baseline_val_loss: float  # the loss of always predicting mean δ (what CAA does)


def fit_mose(h: torch.Tensor, deltas: torch.Tensor, *, experts: int | None = None,
             residual_rank: int = 12, key_dim: int = 64, mlp_hidden: int = 64, epochs: int = 300,
             lr: float = 3e-3, weight_decay: float = 1e-2, patience: int = 30,
             val_share: float = 0.15, seed: int = 0) -> MoseFit:
    """Prototypes + residual basis from δ, then AdamW (warm-up + cosine) with early stopping."""
    n, d = deltas.shape
    if n < 2:
        raise FSteerError(f"MoSE needs at least 2 training pairs, got {n}", "provide more data")
    gen = torch.Generator().manual_seed(seed)
    labels, k = choose_experts(deltas, experts=experts, seed=seed)
    centres = torch.stack([deltas[torch.as_tensor(labels == j)].mean(0) for j in range(k)], 1)
    mean_delta = deltas.mean(0)
    _, _, vh = torch.linalg.svd((deltas - mean_delta).double(), full_matrices=False)
    rank = max(1, min(residual_rank, vh.shape[0]))
    module = MixtureOfSteeringExperts(d, k, rank, key_dim=min(key_dim, d), mlp_hidden=mlp_hidden)
    with torch.no_grad():
        for p in module.parameters():  # seeded init, independent of global RNG state
            if p.dim() > 1:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]), generator=gen)
            else:
                p.zero_()
        module.residual[2].weight.mul_(0.1)
        module.experts.copy_(centres.float())
        module.residual_basis.copy_(vh[:rank].T.float())
        module.in_mean.copy_(h.float().mean(0))
        module.in_scale.fill_(float((h.float() - module.in_mean).norm(dim=1).mean().clamp_min(1e-6)) / math.sqrt(d))

    perm = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(n * val_share))) if n >= 8 else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    hf, df = h.float(), deltas.float()
    scale = float(df.norm(dim=1).pow(2).mean().clamp_min(1e-12))  # loss relative to ‖δ‖²
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, epochs // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: (e + 1) / warm if e < warm else 0.5 * (1 + math.cos(math.pi * (e - warm) / max(1, epochs - warm))))

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        return ((module(hf[idx]) - df[idx]) ** 2).sum(-1).mean() / scale

    best, best_state, bad, epoch = math.inf, None, 0, 0
    batch = 64
    for epoch in range(epochs):
        module.train()
        order = tr_idx[torch.randperm(len(tr_idx), generator=gen)]
        for start in range(0, len(order), batch):
            opt.zero_grad()
            loss = loss_on(order[start:start + batch])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)  # after backward
            opt.step()
        sched.step()
        module.eval()
        with torch.no_grad():
            val = float(loss_on(val_idx if n_val else tr_idx))
        if val < best - 1e-6:
            best, bad = val, 0
            best_state = {k2: v.clone() for k2, v in module.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    module.load_state_dict(best_state)
    module.eval()
    with torch.no_grad():
        train_loss = float(loss_on(tr_idx))
        ref_idx = val_idx if n_val else tr_idx
        base = float(((mean_delta.float()[None] - df[ref_idx]) ** 2).sum(-1).mean() / scale)
    for p in module.parameters():
        p.requires_grad_(False)
    return MoseFit(module, train_loss, best, epoch + 1, base)
