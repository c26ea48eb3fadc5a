"""ONNX Runtime (CPU) vs PyTorch eager: decode throughput of the same steered model, in one run.

    python bench/bench_onnx.py [--adapter DIR] [--onnx DIR] [--out bench/out/onnx] [--threads 1,2]

Same model (SmolLM2-135M-Instruct by default, fp32), same adapter, same chat-templated prompts,
same number of new tokens, greedy, steering on, batch 1 and batch 8. Each engine is timed at each
intra-op thread count in ``--threads`` (default: 1 and the number of cores), in
turns (PyTorch, onnxruntime, PyTorch, ... so that a slow spell of a shared machine hits both), for
``N`` new tokens and for 1 new token (prefill only), best of ``--repeats`` each:

    decode tokens/s     = B·(N − 1) / (T(N) − T(1))
    end-to-end tokens/s = B·N / T(N)

The headline speed-up compares each engine at its own best thread count: that is what a user who
tunes both would get, and it does not penalise PyTorch where its OpenMP threads scale worse
(they do at batch 1 on 2 cores). The per-thread-count ratios are reported as well.

EOS is suppressed (``min_new_tokens`` in eager; no stop in the runner) so both produce exactly N
tokens per row. PyTorch runs Hugging Face ``generate`` inside the steering session, which is what
``fsteer generate`` does; onnxruntime runs :class:`OnnxSteeredModel` (IO binding, KV cache).
Without ``--adapter`` one is trained first on the built-in demo sets (a few minutes on 2 cores);
without ``--onnx`` the model is exported (the export time is part of the report). Writes
``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import timings  # noqa: E402


def _prompts(n: int) -> list[str]:
    from fsteer_export.data import demo_prompts

    harmful, benign = demo_prompts("harmful"), demo_prompts("benign")
    mixed = [p for pair in zip(harmful, benign) for p in pair]
    return mixed[:n]


def _eager_runner(model, tokenizer, prompts: list[str], batch: int):
    from fsteer_export.activations import encode_prompt, pad_left
    from fsteer_export.steering import generation_session

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    chunks = [pad_left(encoded[i:i + batch], tokenizer.pad_token_id, "cpu") for i in range(0, len(encoded), batch)]

    @torch.no_grad()
    def run(n: int):
        out = []
        for ids, mask in chunks:
            with generation_session(model):
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, temperature=None, top_p=None, top_k=None,
                                     pad_token_id=tokenizer.pad_token_id)
            out.append(gen[:, ids.shape[1]:].numpy())
        return out
    return run


def _onnx_runner(runner, prompts: list[str], batch: int):
    from fsteer_export.activations import encode_prompt, pad_left

    encoded = [encode_prompt(runner.tokenizer, p) for p in prompts]
    chunks = [pad_left(encoded[i:i + batch], runner.tokenizer.pad_token_id, "cpu")
              for i in range(0, len(encoded), batch)]

    def run(n: int):
        return [runner.steps(ids.numpy(), mask.numpy(), n)["tokens"] for ids, mask in chunks]
    return run


def _measure_in_turns(runs: dict, rows: int, new_tokens: int, repeats: int) -> tuple[dict, dict]:
    """Time the ``runs`` in turns, best of ``repeats`` each, so a slow spell of the machine hits all of them.

    Each value is ``(prepare, run)``: ``prepare()`` sets the thread count, ``run(n)`` generates n tokens.
    Returns the timings and each run's tokens from its last ``new_tokens`` call (for the comparison).
    """
    for prepare, run in runs.values():
        prepare()
        run(2)  # warm-up (allocations, ORT session graph, torch kernels)
    full: dict = {name: [] for name in runs}
    prefill: dict = {name: [] for name in runs}
    tokens: dict = {}
    for _ in range(repeats):
        for name, (prepare, run) in runs.items():
            prepare()

            def generate_all(name=name, run=run) -> None:
                tokens[name] = run(new_tokens)
            full[name] += timings(generate_all, 1)
            prefill[name] += timings(lambda: run(1), 1)
    out = {}
    for name in runs:
        t_full, t_prefill = min(full[name]), min(prefill[name])
        decode = rows * (new_tokens - 1) / max(1e-9, t_full - t_prefill)
        out[name] = {"seconds_total": round(t_full, 4), "seconds_prefill": round(t_prefill, 4),
                     "decode_tokens_per_s": round(decode, 2),
                     "end_to_end_tokens_per_s": round(rows * new_tokens / t_full, 2)}
    return out, tokens


def _thread_counts(spec: str | None) -> list[int]:
    if spec:
        return [int(t) for t in spec.split(",")]
    return sorted({1, os.cpu_count() or 1})


def _train_adapter(lm, folder: Path) -> None:
    from fsteer_export.adapter import save_adapter
    from fsteer_export.steering import remove_steering
    from fsteer_export.train import TrainOptions, train

    print(f"no --adapter: training one on the demo sets into {folder} (a few minutes) ...", flush=True)
    result = train(lm, ["demo:harmful"], ["demo:benign"], TrainOptions(strength=1.0))
    remove_steering(lm.model)
    save_adapter(folder, result.config, result.head, report=result.report, overwrite=True, plots=False)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", type=Path, help="adapter folder (default: train one on the demo sets)")
    ap.add_argument("--onnx", type=Path, help="an existing export of the same model + adapter (skips the export)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "onnx")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per batch size (a multiple of each batch)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ort-level", default="basic", help="onnxruntime graph optimization level")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", help="comma-separated intra-op thread counts to time both engines at "
                                      "(default: 1 and the number of cores)")
    args = ap.parse_args(argv)
    thread_counts = _thread_counts(args.threads)
    torch.set_num_threads(thread_counts[0])

    from fsteer_export.adapter import load_adapter
    from fsteer_export.generate import generate
    from fsteer_export.models import load_model
    from fsteer_export.onnx_export import export_onnx
    from fsteer_export.onnx_runtime import OnnxSteeredModel, read_meta
    from fsteer_export.steering import remove_steering

    args.out.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model, dtype="float32", device="cpu")
    adapter = args.adapter
    if adapter is None:
        adapter = args.out / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            _train_adapter(lm, adapter)
    onnx_dir = args.onnx
    export_s = None
    if onnx_dir is None:
        onnx_dir = args.out / "model"
        print(f"exporting to {onnx_dir} ...", flush=True)
        t0 = time.perf_counter()
        export_onnx(lm, adapter, onnx_dir, overwrite=True)
        export_s = time.perf_counter() - t0
    meta = read_meta(onnx_dir)
    runners = {t: OnnxSteeredModel(onnx_dir, provider="CPUExecutionProvider", threads=t, optimization=args.ort_level)
               for t in thread_counts}
    load_adapter(lm.model, adapter)
    prompts = _prompts(args.prompts)

    # sanity: the public APIs give the same greedy text (with EOS handling) on these prompts
    ref = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=8)
    got = runners[thread_counts[0]].generate(prompts, max_new_tokens=args.new_tokens, batch_size=8)
    same_text = sum(r.completion == g.completion for r, g in zip(ref, got))
    gates = [round(float(r.gate), 4) for r in ref]

    def threads(t: int):
        return lambda: torch.set_num_threads(t)

    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        runs = {}
        for t in thread_counts:
            runs[("pytorch", t)] = (threads(t), _eager_runner(lm.model, lm.tokenizer, prompts, batch))
            runs[("onnxruntime", t)] = (threads(t), _onnx_runner(runners[t], prompts, batch))
        print(f"batch {batch}: timing PyTorch and onnxruntime in turns at {thread_counts} threads ...", flush=True)
        timed, tokens = _measure_in_turns(runs, len(prompts), args.new_tokens, args.repeats)
        row: dict = {"batch_size": batch, "rows": len(prompts), "new_tokens": args.new_tokens, "by_threads": {}}
        identical = []
        for t in thread_counts:
            pt, ox = timed[("pytorch", t)], timed[("onnxruntime", t)]
            identical.append(int(sum((a == b).all(1).sum()
                                     for a, b in zip(tokens[("pytorch", t)], tokens[("onnxruntime", t)]))))
            row["by_threads"][t] = {"pytorch": pt, "onnxruntime": ox, "identical_tokens_rows": identical[-1],
                                    "decode_speedup": round(ox["decode_tokens_per_s"] / pt["decode_tokens_per_s"], 2)}
        for engine in ("pytorch", "onnxruntime"):
            best = max(thread_counts, key=lambda t: timed[(engine, t)]["decode_tokens_per_s"])
            row[engine] = {"threads": best, **timed[(engine, best)]}
        row["decode_speedup"] = round(row["onnxruntime"]["decode_tokens_per_s"]
                                      / row["pytorch"]["decode_tokens_per_s"], 2)
        row["end_to_end_speedup"] = round(
            max(timed[("onnxruntime", t)]["end_to_end_tokens_per_s"] for t in thread_counts)
            / max(timed[("pytorch", t)]["end_to_end_tokens_per_s"] for t in thread_counts), 2)
        row["identical_tokens_rows"] = min(identical)
        results.append(row)
        print(json.dumps(row), flush=True)
    torch.set_num_threads(thread_counts[0])
    remove_steering(lm.model)

    import onnxruntime
    report = {
        "model": args.model, "adapter": str(adapter), "onnx_folder": str(onnx_dir),
        "export_seconds": round(export_s, 1) if export_s is not None else meta.get("export_seconds"),
        "export_timings_s": meta.get("timings_s"),
        "parity": meta.get("parity"), "kv_cache": meta.get("kv_cache"), "opset": meta.get("opset"),
        "prompts": prompts, "gates": gates,
        "greedy_text_identical": f"{same_text}/{len(prompts)}",
        "results": results,
        "environment": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                        "thread_counts": thread_counts, "onnxruntime_optimization": args.ort_level,
                        "cpu_count": os.cpu_count(),
                        "python": sys.version.split()[0], "machine": platform.machine(),
                        "load_average_at_end": os.getloadavg()},
        "method": ("best of %d runs per engine and thread count, engines timed in turns; "
                   "decode tok/s = B(N-1)/(T(N)-T(1)); EOS suppressed" % args.repeats),
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(_markdown(report))
    print(_markdown(report))
    return report


def _markdown(r: dict) -> str:
    lines = [f"# ONNX Runtime vs PyTorch eager — {r['model']} + FineSteer adapter", "",
             f"Export: {r['export_seconds']} s (graph + checks; {r.get('export_timings_s')}), "
             f"KV cache: {r['kv_cache']}, opset {r['opset']}.", ""]
    p = r.get("parity") or {}
    if p:
        lines += [f"Parity at export ({p.get('prompts')} left-padded prompts, λ = {p.get('strength')}): "
                  f"max |Δlogits| prefill {p.get('prefill_max_abs_diff'):.2e}, decode "
                  f"{p.get('decode_max_abs_diff'):.2e} over {p.get('decode_steps')} steps "
                  f"(bound {p.get('bound', 1e-4):.2e}), "
                  f"greedy tokens identical: {p.get('greedy_tokens_identical')}, λ = 0 vs unsteered "
                  f"{p.get('unsteered_prefill_max_abs_diff'):.2e}.", ""]
    lines += [f"Greedy text through the public APIs (`generate` vs `OnnxSteeredModel.generate`): "
              f"{r['greedy_text_identical']} identical. Gates: {r['gates']}.", "",
              "Each engine at its best thread count (decode tokens/s):", "",
              "| batch | new tokens | PyTorch decode tok/s (threads) | ORT decode tok/s (threads) | "
              "decode speed-up | end-to-end speed-up | rows with identical tokens |",
              "|---|---|---|---|---|---|---|"]
    for row in r["results"]:
        pt, ox = row["pytorch"], row["onnxruntime"]
        lines.append(f"| {row['batch_size']} | {row['new_tokens']} | {pt['decode_tokens_per_s']} ({pt['threads']}) | "
                     f"{ox['decode_tokens_per_s']} ({ox['threads']}) | **{row['decode_speedup']}×** | "
                     f"{row['end_to_end_speedup']}× | {row['identical_tokens_rows']}/{row['rows']} |")
    lines += ["", "Both engines at the same thread count:", "",
              "| batch | threads | PyTorch decode tok/s | ORT decode tok/s | decode speed-up |", "|---|---|---|---|---|"]
    for row in r["results"]:
        for t, m in row["by_threads"].items():
            lines.append(f"| {row['batch_size']} | {t} | {m['pytorch']['decode_tokens_per_s']} | "
                         f"{m['onnxruntime']['decode_tokens_per_s']} | {m['decode_speedup']}× |")
    env = r["environment"]
    lines += ["", f"{r['method']}. torch {env['torch']}, onnxruntime "
              f"{env['onnxruntime']} (CPUExecutionProvider, optimization {env['onnxruntime_optimization']}), "
              f"{env['cpu_count']} CPUs, load average at the end "
              f"{tuple(round(x, 2) for x in env['load_average_at_end'])} (the machine is shared).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
