"""Batched generation with per-row steering state held across decode steps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .activations import context_limit, encode_prompt, encode_prompts, pad_left
from .progress import track
from .steering import generation_session, heads, steering_disabled


@dataclass
class Completion:
    prompt: str
    completion: str
    gate: float | None = None  # summed over adapters: None without an adapter
    gates: dict[str, float] | None = None


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48,
             batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             use_cache: bool = True, steer: bool = True, seed: int | None = None,
             desc: str = "generating") -> list[Completion]:
    """Chat-templated, left-padded batches; each row gets its own gate and vector."""
    if max_new_tokens >= context_limit(model) - 8:
        from .errors import FSteerError
        raise FSteerError(f"--max-new-tokens {max_new_tokens} does not fit the model's context "
                          f"({context_limit(model)} tokens, prompt included)",
                          f"use --max-new-tokens < {context_limit(model) - 8}")
    limit = context_limit(model) - max_new_tokens
    encoded = encode_prompts(tokenizer, prompts, max(8, limit))
    device = next(model.parameters()).device
    results: list[Completion | None] = [None] * len(prompts)
    names = list(heads(model))
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    if seed is not None:
        torch.manual_seed(seed)
    for start in track(range(0, len(order), batch_size), desc, total=math.ceil(len(order) / batch_size)):
        idx = order[start:start + batch_size]
        ids, mask = pad_left([encoded[i] for i in idx], tokenizer.pad_token_id, device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=use_cache,
                      pad_token_id=tokenizer.pad_token_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with generation_session(model) as ctx:
            if steer or not names:
                out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            else:
                with steering_disabled(model):
                    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            gates = {n: g.float().cpu() for n, g in ctx.gates.items()} if steer else {}
        new = out[:, ids.shape[1]:]
        for row, i in enumerate(idx):
            text = tokenizer.decode(new[row], skip_special_tokens=True)
            per = {n: float(g[row]) for n, g in gates.items()}
            results[i] = Completion(prompts[i], text, gate=(sum(per.values()) if names and steer else None),
                                    gates=per or None)
    return results  # type: ignore[return-value]


@torch.no_grad()
def greedy_tokens(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16,
                  use_cache: bool = True, batch_size: int = 8) -> list[list[int]]:
    """Token ids of greedy continuations (for parity tests)."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    device = next(model.parameters()).device
    out_tokens = []
    for start in range(0, len(prompts), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = pad_left(chunk, tokenizer.pad_token_id, device)
        with generation_session(model):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, use_cache=use_cache, pad_token_id=tokenizer.pad_token_id,
                                 temperature=None, top_p=None, top_k=None)
        out_tokens.extend(out[:, ids.shape[1]:].tolist())
    return out_tokens
