"""Steering overhead on generation: tokens/s with an adapter vs the plain model, batch 1 and 8,
interleaved in one run (the machine is noisy: the ratio is what counts).

Two measurements: end-to-end ``generate`` tokens/s (what a user sees, ±2–3 % run-to-run noise
here), and the time of one KV-cache decode forward (the only place steering adds work per token),
as the median of many interleaved blocks of steps — far less noisy.

    .venv/bin/python bench/bench_overhead.py --adapter ADAPTER --out bench/out/overhead
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write  # noqa: E402

from fsteer_export.activations import encode_prompt, pad_left  # noqa: E402
from fsteer_export.adapter import load_adapter  # noqa: E402
from fsteer_export.data import demo_prompts  # noqa: E402
from fsteer_export.models import load_model  # noqa: E402
from fsteer_export.steering import generation_session, remove_steering  # noqa: E402


def _tps(model, tok, prompts, new_tokens: int) -> float:
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    t = time.perf_counter()
    with torch.no_grad(), generation_session(model):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    return len(prompts) * new_tokens / (time.perf_counter() - t)


def _step_times(model, tok, prompts, steps: int) -> list[float]:
    """Seconds per decode forward (one new token, KV cache), the cache cropped back after each step."""
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    out_times = []
    with torch.no_grad(), generation_session(model):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        length = ids.shape[1]
        nxt = out.logits[:, -1:].argmax(-1)
        mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = (mask2.sum(1, keepdim=True) - 1)
        for _ in range(steps):
            t = time.perf_counter()
            model(input_ids=nxt, attention_mask=mask2, position_ids=pos, cache=cache, use_cache=True)
            out_times.append(time.perf_counter() - t)
            cache.crop(length - cache.get_seq_length())  # transformers 5: a negative count removes tokens
    return out_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=Path("bench/out/overhead"))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step-blocks", type=int, default=10, help="interleaved blocks of 20 decode steps")
    a = ap.parse_args()
    lm = load_model(a.model)
    prompts = demo_prompts("harmful")[:4] + demo_prompts("benign")[:4]
    res = {}
    for bs in (1, 8):
        batch = prompts[:bs]
        base, steer = [], []
        _tps(lm.model, lm.tokenizer, batch, 4)  # warm-up
        for _ in range(a.repeats):  # interleaved: base, steered, base, steered, ...
            remove_steering(lm.model)
            base.append(_tps(lm.model, lm.tokenizer, batch, a.new_tokens))
            load_adapter(lm.model, a.adapter)
            steer.append(_tps(lm.model, lm.tokenizer, batch, a.new_tokens))
        mb, ms = sorted(base)[len(base) // 2], sorted(steer)[len(steer) // 2]
        res[f"batch_{bs}"] = {"base_tokens_per_s": round(mb, 2), "steered_tokens_per_s": round(ms, 2),
                              "overhead_pct": round(100 * (mb - ms) / mb, 2), "runs": a.repeats}
        sb, ss = [], []
        for _ in range(a.step_blocks):  # interleaved blocks of decode steps
            remove_steering(lm.model)
            sb += _step_times(lm.model, lm.tokenizer, batch, 20)
            load_adapter(lm.model, a.adapter)
            ss += _step_times(lm.model, lm.tokenizer, batch, 20)
        tb, ts = sorted(sb)[len(sb) // 2], sorted(ss)[len(ss) // 2]
        res[f"batch_{bs}"].update(decode_step_ms_base=round(1e3 * tb, 3), decode_step_ms_steered=round(1e3 * ts, 3),
                                  decode_step_overhead_pct=round(100 * (ts - tb) / tb, 2), decode_steps=len(sb))
    md = ("# Steering overhead (medians of interleaved runs)\n\n| batch | base tok/s | steered tok/s | overhead "
          "| decode step base ms | decode step steered ms | step overhead |\n|---:|---:|---:|---:|---:|---:|---:|\n")
    md += "\n".join(f"| {k.split('_')[1]} | {v['base_tokens_per_s']} | {v['steered_tokens_per_s']} | {v['overhead_pct']} % "
                    f"| {v['decode_step_ms_base']} | {v['decode_step_ms_steered']} | {v['decode_step_overhead_pct']} % |"
                    for k, v in res.items())
    write(a.out, "overhead", res, md)


if __name__ == "__main__":
    main()
