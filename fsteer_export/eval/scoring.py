"""Log-likelihood scoring of (prompt, answer) pairs, batched across questions.

The prompt is chat-templated; the answer follows it in the same sequence. Steering (if any) reads
each row's *prompt* end (``prompt_end``), exactly as it would at generation time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..activations import encode_prompt, pad_left, position_ids
from ..progress import track
from ..steering import prompt_end


@torch.no_grad()
def answer_logprobs(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                    desc: str = "scoring answers") -> list[float]:
    """Sum of log p(answer tokens | prompt) for each (prompt, answer)."""
    device = next(model.parameters()).device
    q_cache: dict[str, list[int]] = {}
    seqs, a_lens = [], []
    for q, a in pairs:
        if q not in q_cache:
            q_cache[q] = encode_prompt(tokenizer, q)
        a_ids = tokenizer(a.strip(), add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        seqs.append(q_cache[q] + a_ids)
        a_lens.append(len(a_ids))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    for start in track(range(0, len(order), batch_size), desc, total=math.ceil(len(order) / batch_size)):
        idx = order[start:start + batch_size]
        ids, mask = pad_left([seqs[i] for i in idx], tokenizer.pad_token_id, device)
        width = ids.shape[1]
        alen = torch.tensor([a_lens[i] for i in idx], device=device)
        with prompt_end(model, width - alen - 1):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                           use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        pos = torch.arange(1, width, device=device)[None, :]
        amask = pos >= (width - alen)[:, None]
        sums = (logp * amask).sum(1)
        for row, i in enumerate(idx):
            out[i] = float(sums[row])
    return out


@torch.no_grad()
def choice_logits(model: nn.Module, tokenizer, prompts: Sequence[str], choices: Sequence[str],
                  batch_size: int = 16, desc: str = "scoring choices") -> torch.Tensor:
    """Next-token logits of each choice label (e.g. A–D) after each prompt: (n, len(choices))."""
    device = next(model.parameters()).device
    label_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.empty(len(prompts), len(choices))
    for start in track(range(0, len(order), batch_size), desc, total=math.ceil(len(order) / batch_size)):
        idx = order[start:start + batch_size]
        ids, mask = pad_left([encoded[i] for i in idx], tokenizer.pad_token_id, device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                       use_cache=False).logits[:, -1].float()
        out[idx] = logits[:, label_ids].cpu()
    return out
