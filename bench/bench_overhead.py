"""Steering overhead on generation: tokens/s with an adapter vs the plain model, batch 1 and 8,
interleaved in one run (the machine is noisy: the ratio is what counts).

Three measurements: end-to-end ``generate`` tokens/s (what a user sees, ±2–3 % run-to-run noise
here); the time of one KV-cache decode forward (the only place steering adds work per token):
the plain model, the model with the adapter and a second plain copy (the control) take decode
steps in turns, and each one's median step time is compared (the control shows what remains of
the machine's noise); and the added work itself, timed in isolation: the backbone pre-hook and each steering wrapper run on the
inputs of a real decode step with the wrapped decoder layer replaced by a stub that returns its
recorded output, minus the cost of calling that stub. The last one is what the steering adds to
each decode step, free of the machine's run-to-run noise (it leaves out cache effects).

    .venv/bin/python bench/bench_overhead.py --adapter ADAPTER --out bench/out/overhead
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import timings, write  # noqa: E402

from fsteer_export.activations import encode_prompt, pad_left  # noqa: E402
from fsteer_export.adapter import load_adapter  # noqa: E402
from fsteer_export.data import demo_prompts  # noqa: E402
from fsteer_export.models import load_model  # noqa: E402
from fsteer_export.steering import generation_session  # noqa: E402


def _tps(model, tok, prompts, new_tokens: int) -> float:
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    t = time.perf_counter()
    with torch.no_grad(), generation_session(model):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    return len(prompts) * new_tokens / (time.perf_counter() - t)


def _alternating_steps(models: dict[str, torch.nn.Module], tok, prompts, steps: int) -> dict[str, float]:
    """Median seconds per decode forward (one new token, KV cache) of each model, the models taking
    turns step by step (order reversed every round), each cache cropped back after its step.

    Why: two runs of the same model minutes apart differ here by 1–3 %; steps taken in turns see
    the same machine state, so drift cancels. The control copy shows the noise that is left
    (0.02–1.1 % in the runs recorded in bench/RESULTS.md)."""
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    pos = mask2.sum(1, keepdim=True) - 1
    length = ids.shape[1]
    times: dict[str, list[float]] = {name: [] for name in models}
    with contextlib.ExitStack() as stack, torch.no_grad():
        caches, nxt = {}, None
        for name, model in models.items():
            stack.enter_context(generation_session(model))
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            caches[name] = getattr(out, "cache", None) or out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1) if nxt is None else nxt
        order = list(models)
        for r in range(steps):
            for name in (order if r % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                models[name](input_ids=nxt, attention_mask=mask2, position_ids=pos, cache=caches[name], use_cache=True)
                times[name].append(time.perf_counter() - t)
                caches[name].crop(length - caches[name].get_seq_length())  # a negative count removes tokens
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


class _Recorded(torch.nn.Module):
    """Stands in for a decoder layer: returns the output recorded in a real decode step."""

    def __init__(self, out) -> None:
        super().__init__()
        self.out = out

    def forward(self, *args, **kwargs):
        return self.out


def _median_us(fn, n: int) -> float:
    return 1e6 * sorted(timings(fn, n))[n // 2]


def _added_work_us(model, tok, prompts, n: int = 2000) -> dict:
    """Microseconds the steering adds to one decode step: pre-hook + wrappers, timed in isolation."""
    from fsteer_export.steering import _backbone, steering_context, steering_layers

    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    layers = steering_layers(model)
    calls: dict[int, tuple] = {}
    backbone_call: list = []
    hooks = [sl.register_forward_pre_hook(lambda m, a, k, i=i: calls.__setitem__(i, (a, k)), with_kwargs=True)
             for i, sl in enumerate(layers)]
    hooks += [sl.base_layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + (o,)))
              for i, sl in enumerate(layers)]
    hooks.append(_backbone(model).register_forward_pre_hook(lambda m, a, k: backbone_call.append((a, k)),
                                                             with_kwargs=True))
    res = {}
    with torch.no_grad(), generation_session(model):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        backbone_call.clear()
        model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask2,
              position_ids=mask2.sum(1, keepdim=True) - 1, cache=cache, use_cache=True)
        for h in hooks:
            h.remove()
        ctx = steering_context(model)
        backbone = _backbone(model)
        a, k = backbone_call[-1]
        pre_hook = backbone._forward_pre_hooks[backbone._fsteer_hook.id]
        res["pre_hook_us"] = round(_median_us(lambda: pre_hook(backbone, a, k), n), 2)
        for i, sl in enumerate(layers):
            args, kwargs, recorded = calls[i]
            real, stub = sl.base_layer, _Recorded(recorded)
            sl.base_layer = stub
            try:
                ctx.prefill = False
                wrapped = _median_us(lambda: sl(*args, **kwargs), n)
                bare = _median_us(lambda: stub(*args, **kwargs), n)
            finally:
                sl.base_layer = real
            res[f"layer_{sl.layer_index}_us"] = round(wrapped - bare, 2)
    res["total_us"] = round(sum(v for k, v in res.items() if k != "total_us"), 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=Path("bench/out/overhead"))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300, help="decode steps per model, taken in turns")
    a = ap.parse_args()
    lm = load_model(a.model)
    # for the step timing: the same model plain, with the adapter, and a second plain copy (control)
    plain, steered, control = lm.model, copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    load_adapter(steered, a.adapter)
    prompts = demo_prompts("harmful")[:4] + demo_prompts("benign")[:4]
    res = {}
    for bs in (1, 8):
        batch = prompts[:bs]
        base, steer = [], []
        for model in (plain, steered):  # warm-up
            _tps(model, lm.tokenizer, batch, 4)
        for r in range(a.repeats):  # in turns: base, steered, steered, base, ...
            for model, into in ((plain, base), (steered, steer)) if r % 2 == 0 else ((steered, steer), (plain, base)):
                into.append(_tps(model, lm.tokenizer, batch, a.new_tokens))
        mb, ms = sorted(base)[len(base) // 2], sorted(steer)[len(steer) // 2]
        res[f"batch_{bs}"] = {"base_tokens_per_s": round(mb, 2), "steered_tokens_per_s": round(ms, 2),
                              "overhead_pct": round(100 * (mb - ms) / mb, 2), "runs": a.repeats}
        med = _alternating_steps({"base": plain, "steered": steered, "control": control}, lm.tokenizer, batch,
                                 a.steps)
        tb, ts, tc = med["base"], med["steered"], med["control"]
        res[f"batch_{bs}"].update(decode_step_ms_base=round(1e3 * tb, 3), decode_step_ms_steered=round(1e3 * ts, 3),
                                  decode_step_overhead_pct=round(100 * (ts - tb) / tb, 2),
                                  decode_step_ms_control=round(1e3 * tc, 3),
                                  control_difference_pct=round(100 * (tc - tb) / tb, 2), decode_steps=a.steps)
        added = _added_work_us(steered, lm.tokenizer, batch)
        res[f"batch_{bs}"].update(added_work_us=added, added_work_pct=round(100 * added["total_us"] / (1e6 * tb), 3))
    md = ("# Steering overhead (medians of interleaved runs)\n\n| batch | base tok/s | steered tok/s | overhead "
          "| decode step base ms | decode step steered ms | step overhead | plain copy vs plain (control) "
          "| added work per step (isolated) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    md += "\n".join(f"| {k.split('_')[1]} | {v['base_tokens_per_s']} | {v['steered_tokens_per_s']} | {v['overhead_pct']} % "
                    f"| {v['decode_step_ms_base']} | {v['decode_step_ms_steered']} | {v['decode_step_overhead_pct']} % "
                    f"| {v['control_difference_pct']} % "
                    f"| {v['added_work_us']['total_us']} µs = {v['added_work_pct']} % |"
                    for k, v in res.items())
    write(a.out, "overhead", res, md)


if __name__ == "__main__":
    main()
