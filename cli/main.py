"""`fsteer`: train, generate, inspect, push, export, eval. All logic lives in fsteer_export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="FineSteer activation steering: train, generate, export (PEFT adapter, ONNX), evaluate.")
export_app = typer.Typer(no_args_is_help=True, help="Export a steered model.")
app.add_typer(export_app, name="export")
_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
         quiet: bool = typer.Option(False, "--quiet", help="No progress bars.")) -> None:
    import os
    _state["debug"] = debug
    if quiet:
        os.environ["FSTEER_QUIET"] = "1"


def _run(fn, *args, **kwargs):
    """Run a command body: user mistakes → one line + exit 2; Ctrl-C → exit 130; any other
    exception (a bug) → one line + exit 1. ``--debug`` shows the traceback instead."""
    from fsteer_export.errors import FSteerError
    try:
        return fn(*args, **kwargs)
    except FSteerError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc.line()}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written", err=True)
        raise typer.Exit(130)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:
        if _state["debug"]:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"error: unexpected {type(exc).__name__}{': ' + first if first else ''} — fix: this is a bug in "
                   "fsteer_export; run again with --debug for the traceback and report it", err=True)
        raise typer.Exit(1)


def _adapter_base(adapters: list[Path]) -> str:
    """The model an adapter was trained on (what --model defaults to when an adapter is given)."""
    from fsteer_export.adapter import read_config
    from fsteer_export.models import DEFAULT_MODEL
    if not adapters:
        return DEFAULT_MODEL
    return read_config(adapters[0]).base_model_name_or_path or DEFAULT_MODEL


@app.command()
def train(
    data: list[str] = typer.Option(..., "--data", help="Prompt file (CSV/JSON/JSONL/TXT), repeatable; 'demo:harmful' for the built-in set."),
    out: Path = typer.Option(..., "--out", help="Adapter folder to write."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Local folder, hub id, .gguf file or alias."),
    task: str = typer.Option("safety", "--task", help="safety | truthfulqa"),
    general: list[str] = typer.Option([], "--general", help="Benign prompts (repeatable): gate negatives and false-positive check."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Steering layer L (default: 40% of depth)."),
    gate_layer: Optional[int] = typer.Option(None, "--gate-layer", help="Gate layer G ≤ L (default: chosen on validation)."),
    experts: Optional[int] = typer.Option(None, "--experts", help="K experts (default: Calinski–Harabasz)."),
    strength: Optional[float] = typer.Option(None, "--strength", help="λ (default: chosen on validation)."),
    gate: Optional[str] = typer.Option(None, "--gate", help="quantile | logistic | soft (default: logistic with --general)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="SCS subspace rank (default: chosen on validation)."),
    gate_pool: Optional[str] = typer.Option(None, "--gate-pool", help="What the gate reads: last (last prompt token) | mean (mean over the prompt) (default: chosen on validation)."),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="Column holding the prompt."),
    on_policy: bool = typer.Option(False, "--on-policy", help="Use the model's own greedy answers as the compliant side (one extra generation pass)."),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
) -> None:
    """Train SCS + MoSE and save a PEFT-layout adapter folder."""
    def body():
        from fsteer_export.adapter import check_output_folder, save_adapter
        from fsteer_export.models import load_model
        from fsteer_export.train import TrainOptions, train as run_train
        check_output_folder(out, overwrite)  # before loading and training: fail fast, write nothing
        lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        opts = TrainOptions(task=task, layer=layer, gate_layer=gate_layer, experts=experts, strength=strength,
                            gate_kind=gate, gate_rank=rank, gate_pool=gate_pool, seed=seed, prompt_column=prompt_column,
                            on_policy=on_policy)
        result = run_train(lm, data, general, opts)
        save_adapter(out, result.config, result.head, report=result.report, overwrite=overwrite)
        r = result.report
        typer.echo(f"chose: layer L={r['layer']}, gate layer G={r['gate_layer']}, gate={r['gate_kind']} "
                   f"(rank {r['gate_rank']}, reading the {'mean over the prompt' if r['gate_pool'] == 'mean' else 'last prompt token'}), experts K={r['experts']}, strength λ={r['strength']}")
        gv = r["gate_validation"]
        fpr = "n/a" if gv["fpr_general"] is None else f"{gv['fpr_general']:.1%}"
        typer.echo(f"gate on validation: fires on {gv['tpr']:.1%} of held-out IR prompts, {fpr} of held-out general prompts")
        typer.echo("time (s): " + ", ".join(f"{k} {v}" for k, v in r["timings_s"].items()))
        typer.echo(f"adapter saved to {out}")
    _run(body)


@app.command()
def generate(
    model: Optional[str] = typer.Option(None, "--model", help="Default: the first adapter's base model, else smollm2-135m-instruct."),
    adapter: list[Path] = typer.Option([], "--adapter", help="Adapter folder (repeatable: adapters compose)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Run an exported ONNX folder with onnxruntime instead."),
    prompt: list[str] = typer.Option([], "--prompt", help="A prompt (repeatable)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="File of prompts."),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
    strength: Optional[float] = typer.Option(None, "--strength", help="Override λ of every adapter."),
    compare: bool = typer.Option(False, "--compare", help="Also show the unsteered answer side by side."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line: prompt, completion, gate."),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("auto", "--device"),
    provider: Optional[str] = typer.Option(None, "--provider", help="onnxruntime execution provider (with --onnx)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Generate with (and optionally without) steering."""
    def body():
        from fsteer_export.data import load_prompts
        from fsteer_export.errors import FSteerError
        prompts = list(prompt)
        if prompts_file is not None:
            prompts += load_prompts(prompts_file, prompt_column, dedupe=False)
        if not prompts:
            raise FSteerError("no prompts given", "pass --prompt TEXT or --prompts-file FILE")
        if max_new_tokens < 1 or batch_size < 1:
            raise FSteerError("--max-new-tokens and --batch-size must be ≥ 1", "pass positive values")
        if onnx is not None:
            from fsteer_export.onnx_runtime import OnnxSteeredModel
            runner = OnnxSteeredModel(onnx, provider=provider)
            rows = runner.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   do_sample=sample, temperature=temperature, top_p=top_p, seed=seed,
                                   strength=strength)
            base_rows = None
            if compare:
                base_rows = runner.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                            do_sample=sample, temperature=temperature, top_p=top_p, seed=seed,
                                            strength=0.0)
        else:
            from fsteer_export.adapter import load_adapter
            from fsteer_export.generate import generate as run_generate
            from fsteer_export.models import load_model
            from fsteer_export.steering import strength_override
            import contextlib
            lm = load_model(model or _adapter_base(adapter), dtype=dtype, device=device,
                            trust_remote_code=trust_remote_code)
            for i, folder in enumerate(adapter):
                load_adapter(lm.model, folder, name="default" if i == 0 else f"adapter{i}")
            ctx = strength_override(lm.model, strength) if strength is not None and adapter else contextlib.nullcontext()
            kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=sample,
                      temperature=temperature, top_p=top_p, seed=seed)
            with ctx:
                rows = run_generate(lm.model, lm.tokenizer, prompts, **kw)
            base_rows = run_generate(lm.model, lm.tokenizer, prompts, steer=False, **kw) if compare else None
        for i, r in enumerate(rows):
            if as_json:
                obj = {"prompt": r.prompt, "completion": r.completion}
                if r.gate is not None:
                    obj["gate"] = r.gate
                if r.gates and len(r.gates) > 1:
                    obj["gates"] = r.gates
                if base_rows is not None:
                    obj["unsteered"] = base_rows[i].completion
                typer.echo(json.dumps(obj, ensure_ascii=False))
            else:
                gate = "" if r.gate is None else f"  [gate {r.gate:.2f}]"
                typer.echo(f"### {r.prompt}{gate}")
                if base_rows is not None:
                    typer.echo(f"--- unsteered:\n{base_rows[i].completion.strip()}\n--- steered:")
                typer.echo(r.completion.strip() + "\n")
    _run(body)


@app.command()
def inspect(adapter: Path = typer.Argument(..., help="Adapter folder."),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """What an adapter contains: model, layers, K, rank, ε, λ, sizes."""
    def body():
        from fsteer_export.adapter import adapter_summary
        s = adapter_summary(adapter)
        if as_json:
            typer.echo(json.dumps(s, indent=2))
            return
        files = s.pop("files")
        for k, v in s.items():
            typer.echo(f"{k:>20}: {v}")
        typer.echo(f"{'files':>20}:")
        for name, size in files.items():
            typer.echo(f"{'':>22}{name}  {size:,} bytes")
    _run(body)


@app.command()
def push(adapter: Path = typer.Argument(..., help="Adapter folder."),
         repo_id: str = typer.Option(..., "--repo-id", help="Hub repository, e.g. me/smollm2-finesteer-safety."),
         private: bool = typer.Option(False, "--private"),
         token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: the logged-in one).")) -> None:
    """Upload an adapter folder to the Hugging Face Hub."""
    def body():
        from fsteer_export.hub import push_adapter
        url = push_adapter(adapter, repo_id, private=private, token=token)
        typer.echo(f"uploaded to {url}")
    _run(body)


@app.command("eval")
def eval_cmd(
    suite: str = typer.Option(..., "--suite", help="safety | truthfulqa | utility"),
    out: Path = typer.Option(..., "--out", help="Report folder (results.json, report.md, plots)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model"),
    adapter: list[Path] = typer.Option([], "--adapter", help="Adapter to evaluate (utility; safety: instead of training FineSteer)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma list, e.g. none,finesteer,caa,rv,cast,mose-only,scs-only."),
    train_data: list[str] = typer.Option([], "--train", help="safety: harmful prompts to train every method on (repeatable)."),
    general: list[str] = typer.Option([], "--general", help="safety: benign prompts for training (gate negatives, rv, cast)."),
    harmful: list[str] = typer.Option([], "--harmful", help="safety: held-out harmful test prompts (repeatable)."),
    benign: list[str] = typer.Option([], "--benign", help="safety: held-out benign test prompts, NAME=PATH or PATH (repeatable)."),
    data: Optional[str] = typer.Option(None, "--data", help="truthfulqa: TruthfulQA.csv or mc_task.json; utility: MMLU folder."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Cap on test prompts / questions."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Evaluate FineSteer side by side with baselines; writes results.json, report.md and plots."""
    def body():
        from fsteer_export.errors import FSteerError
        from fsteer_export.eval.report import write_report
        from fsteer_export.models import load_model
        from fsteer_export.adapter import check_output_folder
        check_output_folder(out, overwrite)  # before loading the model and any long work
        chosen = [m.strip() for m in methods.split(",")] if methods else None
        lm = load_model(model, dtype=dtype, device=device)
        if suite == "safety":
            from fsteer_export.baselines import METHODS
            from fsteer_export.eval.safety import SafetyOptions, run_safety
            if not train_data or not harmful or not benign:
                raise FSteerError("the safety suite needs --train, --harmful and --benign", "pass all three (paths)")
            bad = [m for m in (chosen or []) if m not in METHODS]
            if bad:
                raise FSteerError(f"unknown method {bad[0]!r}", f"use some of {', '.join(METHODS)}")
            sets: dict[str, list[str]] = {}
            for item in benign:
                name, _, path = item.rpartition("=") if "=" in item else (Path(item).stem, "", item)
                sets.setdefault(name, []).append(path)
            opts = SafetyOptions(seed=seed, **({"methods": chosen} if chosen else {}),
                                 **({"n_harmful": limit, "n_benign": limit} if limit else {}))
            results = run_safety(lm, train_data, general, harmful, sets, opts,
                                 adapter=adapter[0] if adapter else None)
        elif suite == "truthfulqa":
            from fsteer_export.eval.truthfulqa import TruthfulOptions, run_truthfulqa
            if not data:
                raise FSteerError("the truthfulqa suite needs --data", "pass TruthfulQA.csv or mc_task.json")
            opts = TruthfulOptions(seed=seed, **({"methods": chosen} if chosen else {}), limit=limit or 200)
            results = run_truthfulqa(lm, data, opts)
        elif suite == "utility":
            from fsteer_export.adapter import load_adapter
            from fsteer_export.eval.utility import run_utility
            if not data:
                raise FSteerError("the utility suite needs --data", "pass an MMLU folder of CSVs")
            for i, folder in enumerate(adapter):
                load_adapter(lm.model, folder, name="default" if i == 0 else f"adapter{i}")
            results = run_utility(lm, data, per_subject=limit or 5, seed=seed)
        else:
            raise FSteerError(f"unknown suite {suite!r}", "use safety, truthfulqa or utility")
        write_report(results, out, overwrite=overwrite)
        typer.echo((out / "report.md").read_text())
    _run(body)


@export_app.command("onnx")
def export_onnx_cmd(
    adapter: Path = typer.Option(..., "--adapter", help="Adapter folder written by fsteer train."),
    out: Path = typer.Option(..., "--out", help="Folder to write (model.onnx, config, tokenizer, fsteer_onnx.json)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: the adapter's base model)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset, 18 or newer (default: torch.onnx's, 20 with torch 2.13)."),
    no_kv_cache: bool = typer.Option(False, "--no-kv-cache", help="Graph without past key/values (recomputes every step)."),
    strength: Optional[float] = typer.Option(None, "--strength", help="Default λ stored with the export (a graph input)."),
    decode_steps: int = typer.Option(16, "--decode-steps", help="Greedy decode steps checked against PyTorch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Export base model + adapter to ONNX (steering inside the graph), checked against PyTorch."""
    def body():
        from fsteer_export.adapter import read_config
        from fsteer_export.models import DEFAULT_MODEL
        from fsteer_export.onnx_export import export_onnx
        base = model or read_config(adapter).base_model_name_or_path or DEFAULT_MODEL
        res = export_onnx(base, adapter, out, opset=opset, kv_cache=not no_kv_cache, overwrite=overwrite,
                          strength=strength, decode_steps=decode_steps, trust_remote_code=trust_remote_code)
        p = res.parity
        typer.echo(f"exported in {res.export_seconds:.1f} s ({'with' if not no_kv_cache else 'without'} KV cache, "
                   f"opset {res.meta.get('opset')}, default λ={res.meta.get('default_strength')})")
        typer.echo(f"parity vs PyTorch on {p['prompts']} padded prompts: max |Δlogits| prefill "
                   f"{p['prefill_max_abs_diff']:.2e}, decode {p['decode_max_abs_diff']:.2e} over "
                   f"{p['decode_steps']} steps, greedy tokens identical: {p['greedy_tokens_identical']}, "
                   f"λ=0 vs unsteered {p['unsteered_prefill_max_abs_diff']:.2e}")
        typer.echo(f"saved to {out}")
    _run(body)


if __name__ == "__main__":  # pragma: no cover
    app()
