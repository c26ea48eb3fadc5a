"""Batched, padding-aware extraction of the activations FineSteer is fitted on (DESIGN §2.1).

Index convention (the same in training, eager, PEFT and ONNX):
- ``prompt state at layer l`` = the *input* of decoder layer l (= ``output_hidden_states[l]``)
  at the last prompt token;
- ``δ at layer L`` = mean over answer tokens of the *output* of layer L (= ``hidden_states[L+1]``)
  for q + a⁺, minus the same for q + a⁻.
Forward hooks on the decoder layers read exactly these tensors, in the same pass; the prompt
state of a pair comes from its q + a⁺ pass (causal attention: the answer does not change it).
Results are cached as safetensors keyed by model, layers and data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import GATE_POOLS
from .data import Pair
from .errors import FSteerError, warn
from .models import cache_dir, decoder_layers
from .progress import track
from .steering import gate_features, prompt_pool_weights


def format_prompt(tokenizer, prompt: str) -> str:
    """The chat-templated prompt (generation prompt appended) when the tokenizer has a template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
    return prompt


def encode_prompt(tokenizer, prompt: str, max_length: int | None = None) -> list[int]:
    templated = bool(getattr(tokenizer, "chat_template", None))
    ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=not templated)["input_ids"]
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]  # keep the end: the chat template's generation prompt is there
    return ids


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int | None = None,
                   what: str = "prompt") -> list[list[int]]:
    """Encode many prompts; those longer than ``max_length`` tokens are cut from the left (the chat
    template's generation prompt at the end is kept) and one warning says how many were cut."""
    full = [encode_prompt(tokenizer, p) for p in prompts]
    if max_length is None:
        return full
    long = [len(ids) for ids in full if len(ids) > max_length]
    if long:
        warn(f"{len(long)} {what}(s) longer than the model's context allows ({max(long)} tokens > {max_length}) "
             f"were truncated from the left, keeping the last {max_length} tokens (the chat template's end)")
    return [ids[-max_length:] if len(ids) > max_length else ids for ids in full]


def context_limit(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


def pad_left(seqs: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as HF generate computes them for left padding (absolute-position models like GPT-2
    then see the same positions in training, scoring and generation)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class _StopForward(Exception):
    """Raised by the last needed layer's hook: the rest of the network is not computed."""


class _LayerTaps:
    """Forward hooks that keep the input and output hidden states of chosen decoder layers.

    The forward pass stops after the deepest layer needed (no later layers, no LM head), so
    extraction costs less than a plain forward pass.
    """

    def __init__(self, model: nn.Module, inputs: Sequence[int], outputs: Sequence[int]) -> None:
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.model = model
        layers = decoder_layers(model)
        self.handles = []
        wanted = sorted(set(inputs) | set(outputs))
        for l in wanted:
            self.handles.append(layers[l].register_forward_hook(
                self._hook(l, l in inputs, l in outputs, l == wanted[-1]), with_kwargs=True))

    def _hook(self, index: int, keep_in: bool, keep_out: bool, last: bool):
        def hook(module, args, kwargs, out):
            if keep_in:
                self.inputs[index] = args[0] if args else kwargs["hidden_states"]
            if keep_out:
                self.outputs[index] = out[0] if isinstance(out, tuple) else out
            if last:
                raise _StopForward
        return hook

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids(attention_mask), use_cache=False)
        except _StopForward:
            pass

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise FSteerError(f"NaN/Inf activations at {what}",
                          "use --dtype float32, an earlier layer, or check the model weights")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prompt_features(model: nn.Module, tokenizer, prompts: Sequence[str], layers: Sequence[int],
                    batch_size: int = 16, desc: str = "prompt states",
                    pools: Sequence[str] = GATE_POOLS) -> dict[str, dict[int, torch.Tensor]]:
    """Input of each layer in ``layers`` per prompt, read the ways the gate can read it:
    {"last": {layer: (n, d)}, "mean": {layer: (n, d)}} in float32 (one forward pass for all)."""
    if not prompts:
        raise FSteerError("no prompts to extract activations from", "provide a non-empty data file")
    limit = context_limit(model)
    encoded = encode_prompts(tokenizer, prompts, limit)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
    taps = _LayerTaps(model, layers, [])
    chunks: dict[tuple[str, int], list[tuple[list[int], torch.Tensor]]] = {(p, l): [] for p in pools for l in layers}
    device = _model_device(model)
    try:
        for start in track(range(0, len(order), batch_size), desc,
                           total=math.ceil(len(order) / batch_size)):
            idx = order[start:start + batch_size]
            ids, mask = pad_left([encoded[i] for i in idx], tokenizer.pad_token_id, device)
            taps.run(ids, mask)
            weights = prompt_pool_weights(mask, None, tuple(ids.shape), device)
            for l in layers:
                h = taps.inputs[l]
                feats = gate_features(h, h[:, -1, :].float(), weights, pools)
                for pool in pools:
                    t = feats[pool].cpu()
                    _check_finite(t, f"the input of layer {l}")
                    chunks[pool, l].append((idx, t))
    finally:
        taps.close()
    out: dict[str, dict[int, torch.Tensor]] = {p: {} for p in pools}
    for (pool, l), parts in chunks.items():
        full = torch.empty(len(prompts), parts[0][1].shape[1])
        for idx, t in parts:
            full[idx] = t
        out[pool][l] = full
    return out


def prompt_states(model: nn.Module, tokenizer, prompts: Sequence[str], layers: Sequence[int],
                  batch_size: int = 16, desc: str = "prompt states", pool: str = "last") -> dict[int, torch.Tensor]:
    """Input of each layer in ``layers`` at each prompt's last token (``pool="last"``) or averaged over
    its tokens (``"mean"``, as the steering module's gate reads it): {layer: (n, d) float32}."""
    return prompt_features(model, tokenizer, prompts, layers, batch_size, desc, pools=(pool,))[pool]


@torch.no_grad()
def pair_activations(model: nn.Module, tokenizer, pairs: Sequence[Pair], prompt_layers: Sequence[int],
                     delta_layers: Sequence[int], batch_size: int = 16, max_answer_tokens: int = 48,
                     desc: str = "pair activations", pools: Sequence[str] = GATE_POOLS,
                     ) -> tuple[dict[str, dict[int, torch.Tensor]], dict[int, torch.Tensor]]:
    """Prompt states ({pool: {layer: (n, d)}}, as :func:`prompt_features`) and δ ({layer: (n, d)})
    from q+a⁺ and q+a⁻ passes. Causal attention: the prompt's states do not see the answer."""
    if not pairs:
        raise FSteerError("no training pairs", "provide a non-empty data file")
    limit = context_limit(model)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    seqs, answer_lens = [], []
    questions = encode_prompts(tokenizer, [p.prompt for p in pairs], max(8, limit - max_answer_tokens - 1))
    for p, q in zip(pairs, questions):
        for answer in (p.positive, p.negative):
            a = tokenizer(answer, add_special_tokens=False)["input_ids"][:max_answer_tokens] or eos
            seqs.append(q + a)
            answer_lens.append(len(a))
    n = len(pairs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    taps = _LayerTaps(model, prompt_layers, delta_layers)
    device = _model_device(model)
    d = None
    means: dict[int, torch.Tensor] = {}
    states: dict[tuple[str, int], torch.Tensor] = {}
    try:
        for start in track(range(0, len(order), batch_size), desc, total=math.ceil(len(order) / batch_size)):
            idx = order[start:start + batch_size]
            ids, mask = pad_left([seqs[i] for i in idx], tokenizer.pad_token_id, device)
            taps.run(ids, mask)
            width = ids.shape[1]
            alen = torch.tensor([answer_lens[i] for i in idx], device=device)
            pos = torch.arange(width, device=device)[None, :]
            amask = (pos >= width - alen[:, None]).float()[..., None]  # answer tokens (left padded)
            q_last = width - alen - 1
            rows = torch.arange(len(idx), device=device)
            for l in delta_layers:
                h = taps.outputs[l].float()
                m = (h * amask).sum(1) / alen[:, None].float()
                _check_finite(m, f"the output of layer {l}")
                if d is None:
                    d = m.shape[1]
                means.setdefault(l, torch.empty(len(seqs), d))[idx] = m.cpu()
            weights = prompt_pool_weights(mask, q_last, tuple(ids.shape), device)
            for l in prompt_layers:
                h = taps.inputs[l]
                feats = gate_features(h, h[rows, q_last].float(), weights, pools)
                for pool in pools:
                    s = feats[pool]
                    _check_finite(s, f"the input of layer {l}")
                    states.setdefault((pool, l), torch.empty(len(seqs), s.shape[1]))[idx] = s.cpu()
    finally:
        taps.close()
    deltas = {l: means[l][0::2] - means[l][1::2] for l in delta_layers}
    prompt = {p: {l: states[p, l][0::2].contiguous() for l in prompt_layers} for p in pools}
    assert all(v.shape[0] == n for v in deltas.values())
    return prompt, deltas


# -- cache -------------------------------------------------------------------------------

CACHE_VERSION = 3  # bump when extraction changes (2: explicit position_ids from the mask; 3: mean-pooled states)


def cache_key(*parts) -> str:
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def cached(key: str, compute, enabled: bool = True) -> dict[str, torch.Tensor]:
    """Load ``{name: tensor}`` from the activation cache, or compute and store it atomically."""
    path = cache_dir() / "activations" / f"{key}.safetensors"
    if enabled and path.is_file():
        try:
            return load_file(str(path))
        except Exception:  # a corrupt cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    tensors = compute()
    if enabled:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return tensors
