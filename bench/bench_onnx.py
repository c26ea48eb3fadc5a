"""ONNX Runtime (CPU) vs PyTorch eager: decode throughput of the same steered model, in one run.

    python bench/bench_onnx.py [--adapter DIR] [--onnx DIR] [--out bench/out/onnx]

Same model (SmolLM2-135M-Instruct by default, fp32), same adapter, same chat-templated prompts,
same number of new tokens, greedy, steering on, batch 1 and batch 8, the same number of threads
(``--threads``, default 1). Each engine is timed for ``N`` new tokens and for 1 new token (prefill
only), best of ``--repeats`` each:

    decode tokens/s     = B·(N − 1) / (T(N) − T(1))
    end-to-end tokens/s = B·N / T(N)

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


def _best(fn, repeats: int) -> float:
    return min(timings(fn, repeats))


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


def _measure(run, rows: int, new_tokens: int, repeats: int) -> dict:
    run(2)  # warm-up (allocations, ORT session graph, torch kernels)
    t_full = _best(lambda: run(new_tokens), repeats)
    t_prefill = _best(lambda: run(1), repeats)
    decode = rows * (new_tokens - 1) / max(1e-9, t_full - t_prefill)
    return {"seconds_total": round(t_full, 4), "seconds_prefill": round(t_prefill, 4),
            "decode_tokens_per_s": round(decode, 2), "end_to_end_tokens_per_s": round(rows * new_tokens / t_full, 2)}


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
    ap.add_argument("--ort-levels", default="basic,all",
                    help="onnxruntime graph optimization levels to time; the first is the headline")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for both engines (1: fair and stable on a shared machine; "
                         "torch's OpenMP threads collapse when the cores are oversubscribed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

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
    levels = args.ort_levels.split(",")
    runners = {lv: OnnxSteeredModel(onnx_dir, provider="CPUExecutionProvider", threads=args.threads, optimization=lv)
               for lv in levels}
    runner = runners[levels[0]]
    load_adapter(lm.model, adapter)
    prompts = _prompts(args.prompts)

    # sanity: the public APIs give the same greedy text (with EOS handling) on these prompts
    ref = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=8)
    got = runner.generate(prompts, max_new_tokens=args.new_tokens, batch_size=8)
    same_text = sum(r.completion == g.completion for r, g in zip(ref, got))
    gates = [round(float(r.gate), 4) for r in ref]

    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        eager = _eager_runner(lm.model, lm.tokenizer, prompts, batch)
        ort_run = _onnx_runner(runner, prompts, batch)
        row = {"batch_size": batch, "rows": len(prompts), "new_tokens": args.new_tokens}
        print(f"batch {batch}: PyTorch eager ...", flush=True)
        row["pytorch"] = _measure(eager, len(prompts), args.new_tokens, args.repeats)
        print(f"batch {batch}: onnxruntime ...", flush=True)
        row["onnxruntime"] = _measure(ort_run, len(prompts), args.new_tokens, args.repeats)
        row["onnxruntime_levels"] = {levels[0]: row["onnxruntime"]}
        for lv in levels[1:]:
            print(f"batch {batch}: onnxruntime ({lv}) ...", flush=True)
            row["onnxruntime_levels"][lv] = _measure(_onnx_runner(runners[lv], prompts, batch), len(prompts),
                                                     args.new_tokens, args.repeats)
        row["decode_speedup_by_level"] = {
            lv: round(m["decode_tokens_per_s"] / row["pytorch"]["decode_tokens_per_s"], 2)
            for lv, m in row["onnxruntime_levels"].items()}
        row["decode_speedup"] = round(row["onnxruntime"]["decode_tokens_per_s"]
                                      / row["pytorch"]["decode_tokens_per_s"], 2)
        row["end_to_end_speedup"] = round(row["onnxruntime"]["end_to_end_tokens_per_s"]
                                          / row["pytorch"]["end_to_end_tokens_per_s"], 2)
        toks_e, toks_o = eager(args.new_tokens), ort_run(args.new_tokens)
        row["identical_tokens_rows"] = int(sum((a == b).all(1).sum() for a, b in zip(toks_e, toks_o)))
        results.append(row)
        print(json.dumps(row), flush=True)
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
                        "torch_threads": torch.get_num_threads(), "onnxruntime_threads": args.threads,
                        "cpu_count": os.cpu_count(),
                        "python": sys.version.split()[0], "machine": platform.machine(),
                        "load_average_at_end": os.getloadavg()},
        "method": "best of %d runs; decode tok/s = B(N-1)/(T(N)-T(1)); EOS suppressed" % args.repeats,
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
              "| batch | new tokens | PyTorch decode tok/s | ORT decode tok/s | decode speed-up | "
              "PyTorch end-to-end tok/s | ORT end-to-end tok/s | end-to-end speed-up | rows with identical tokens |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in r["results"]:
        pt, ox = row["pytorch"], row["onnxruntime"]
        lines.append(f"| {row['batch_size']} | {row['new_tokens']} | {pt['decode_tokens_per_s']} | "
                     f"{ox['decode_tokens_per_s']} | {row['decode_speedup']}× | {pt['end_to_end_tokens_per_s']} | "
                     f"{ox['end_to_end_tokens_per_s']} | {row['end_to_end_speedup']}× | "
                     f"{row['identical_tokens_rows']}/{row['rows']} |")
    for row in r["results"]:
        if len(row.get("decode_speedup_by_level", {})) > 1:
            lines.append("")
            lines.append(f"Batch {row['batch_size']}, decode speed-up by onnxruntime optimization level: " + ", ".join(
                f"{lv} {sp}×" for lv, sp in row["decode_speedup_by_level"].items()))
    env = r["environment"]
    lines += ["", f"{r['method']}. torch {env['torch']} ({env['torch_threads']} threads), onnxruntime "
              f"{env['onnxruntime']} (CPUExecutionProvider, {env['onnxruntime_threads']} threads), "
              f"{env['cpu_count']} CPUs, load average at the end "
              f"{tuple(round(x, 2) for x in env['load_average_at_end'])} (the machine is shared).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
