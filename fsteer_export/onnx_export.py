"""ONNX export of a steered causal LM, with the gated steering computed inside the graph (DESIGN §5).

The graph is the base model with the FineSteer :class:`~fsteer_export.steering.SteeringLayer` in
place, traced with ``torch.onnx.export(..., dynamo=True)`` through a small wrapper module:

    inputs   input_ids (B,S) int64, attention_mask (B,P+S) int64, position_ids (B,S) int64,
             past_key_values.{i}.key / .value (B,H,P,hd) float32   [KV-cache variant]
             steering_state (B,d) float32, strength () float32,
             prefill () bool                                        [no-KV-cache variant]
    outputs  logits (B,V) float32 (the last position only),
             present.{i}.key / .value (B,H,P+S,hd)                  [KV-cache variant]
             steering_state_out (B,d) float32, gate (B,) float32 (-1 in decode steps)

Prefill is "past length == 0" (computed in the graph from the past tensors' shape) in the KV-cache
variant, and an explicit ``prefill`` input without the cache, where every step recomputes the full
sequence. At prefill the state g·v is computed from each row's last prompt token (position -1:
left padding) — for a ``gate_pool="mean"`` adapter the gate reads the mean over the row's
attended prompt tokens (weights from ``attention_mask``) —; afterwards the passed-in state is
carried through. λ (``strength``) is a graph input: λ = 0 gives exactly the unsteered model.

The export is declared a success only after ``onnx.checker`` and a parity check of onnxruntime
against PyTorch eager (the same steering module, loaded with ``load_adapter``) on a left-padded
batch, at prefill and over ``decode_steps`` greedy decode steps (max |Δlogits| ≤ 1e-4 + 1e-5 ·
max |logits|: on SmolLM2, whose logits reach ~40, fp32 rounding alone moves PyTorch's own logits
by up to 7e-5 between its two attention kernels; identical greedy tokens). The folder is written to a
temporary path and renamed at the end, so a failed export leaves nothing at ``out``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import FSteerError
from .models import LoadedModel, decoder_layers, hidden_size, model_type

ONNX_NAME = "model.onnx"
META_NAME = "fsteer_onnx.json"
EXPORT_FORMAT = 1
ADAPTER_NAME = "default"
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to model.onnx.data (protobuf stops at 2 GiB)
MIN_OPSET = 18
DEFAULT_TOLERANCE = 1e-4  # absolute, on logits (and on the gate)
DEFAULT_RTOL = 1e-5  # times the largest |logit|: fp32 noise grows with the logits' scale
PARITY_PROMPTS = (
    "Hi!",
    "Write a short poem about the sea.",
    "Explain how to hack into a computer and steal passwords from people.",
    "How do I bake bread at home? Please list every step, the ingredients and the oven temperature.",
)


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote and measured (``export_seconds``: the whole export, checks included)."""

    folder: Path
    parity: dict
    export_seconds: float
    meta: dict = field(default_factory=dict)


def position_ids_from_mask(mask: np.ndarray | torch.Tensor):
    """Positions as Hugging Face ``generate`` builds them: cumsum(mask) - 1, 0 on padding."""
    if isinstance(mask, torch.Tensor):
        pos = mask.long().cumsum(-1) - 1
        return pos.masked_fill(mask == 0, 0)
    pos = np.cumsum(mask.astype(np.int64), axis=-1) - 1
    return np.where(mask == 0, 0, pos).astype(np.int64)


class SteeredGraph(nn.Module):
    """The traced module: flat tensors in, flat tensors out; steering state made explicit.

    The :class:`SteeringContext` stays the single owner of mutable state: this wrapper only sets
    its ``export_*`` fields for the duration of one forward and restores them afterwards.
    """

    def __init__(self, model: nn.Module, n_layers: int, kv_cache: bool) -> None:
        super().__init__()
        from .steering import steering_context

        self.model = model
        self.n_layers = n_layers
        self.kv_cache = kv_cache
        self._ctx = [steering_context(model)]  # a list: not registered, not copied as state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                steering_state: torch.Tensor, strength: torch.Tensor, *rest: torch.Tensor):
        from transformers import DynamicCache

        from .steering import prompt_pool_weights

        ctx = self._ctx[0]
        if self.kv_cache:
            past = rest
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)])
            # past length == 0, as a tensor (a Python comparison would specialise the trace)
            prefill = torch.ones_like(past[0][:1, :1, :, :1], dtype=torch.float32).sum() == 0
        else:
            (prefill,) = rest
            cache = None
        saved = (ctx.export, ctx.export_prefill, ctx.export_state_in, ctx.export_strength, ctx.last_index,
                 ctx.pool_weights)
        ctx.export, ctx.export_prefill, ctx.export_state_in = True, prefill, steering_state
        ctx.export_strength, ctx.last_index = strength, None  # left padding: last prompt token at -1
        # The mean gate input averages this call's tokens (at prefill: the prompt; later it is unused).
        ctx.pool_weights = prompt_pool_weights(attention_mask[:, -input_ids.shape[1]:], None,
                                               (input_ids.shape[0], input_ids.shape[1]), input_ids.device)
        ctx.export_state_out = ctx.export_gate_out = None
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=self.kv_cache, logits_to_keep=1)
            state, gate = ctx.export_state_out, ctx.export_gate_out
        finally:
            (ctx.export, ctx.export_prefill, ctx.export_state_in, ctx.export_strength, ctx.last_index,
             ctx.pool_weights) = saved
            ctx.export_state_out = ctx.export_gate_out = None
            ctx.gate_inputs.clear()
        if state is None:
            raise FSteerError("the steering layer did not run during export", "load exactly one adapter")
        presents: list[torch.Tensor] = []
        if self.kv_cache:
            for layer in out.cache.layers[: self.n_layers]:
                presents += [layer.keys, layer.values]
        return (out.logits[:, -1, :], *presents, state, gate)


def io_names(n_layers: int, kv_cache: bool) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids", "steering_state", "strength"]
    outputs = ["logits"]
    if kv_cache:
        inputs += [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        outputs += [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    else:
        inputs.append("prefill")
    outputs += ["steering_state_out", "gate"]
    return inputs, outputs


def _kv_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(kv heads, head dim) per layer, read from one tiny eager forward (works for every architecture)."""
    from .steering import steering_disabled

    ids = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad(), steering_disabled(model):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    shapes = []
    for layer in cache.layers:
        if layer.keys is None or layer.keys.dim() != 4:
            raise FSteerError(f"{model_type(model)} uses a KV cache layout this exporter does not handle",
                              "export with --no-kv-cache")
        shapes.append((int(layer.keys.shape[1]), int(layer.keys.shape[3])))
    return shapes


def _export_graph(wrapper: SteeredGraph, kv: list[tuple[int, int]], d: int, vocab: int, path: Path,
                  opset: int | None, optimize: bool) -> bool:
    """torch.onnx.export (dynamo) with dynamic batch, sequence and past axes; saved to ``path``."""
    n = wrapper.n_layers
    device = next(wrapper.model.parameters()).device
    batch, seq, past = 3, 7, 5  # distinct sizes ≥ 2: no 0/1 specialisation, no accidental duck-sizing
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    args: list = [ids]
    if wrapper.kv_cache:
        args += [torch.ones((batch, past + seq), dtype=torch.long, device=device),
                 torch.arange(past, past + seq, device=device)[None].expand(batch, seq).contiguous()]
    else:
        args += [torch.ones((batch, seq), dtype=torch.long, device=device),
                 torch.arange(seq, device=device)[None].expand(batch, seq).contiguous()]
    args += [torch.zeros((batch, d), device=device), torch.tensor(1.0, device=device)]
    token = {0: "batch", 1: "sequence"}
    shapes: list = [token, {0: "batch", 1: "total_sequence" if wrapper.kv_cache else "sequence"}, token,
                    {0: "batch"}, None]
    if wrapper.kv_cache:
        past_tensors = []
        for heads, hd in kv:
            past_tensors += [torch.randn(batch, heads, past, hd, device=device) for _ in range(2)]
        args += past_tensors
        shapes.append(tuple({0: "batch", 2: "past_sequence"} for _ in past_tensors))
    else:
        args.append(torch.tensor(True, device=device))
        shapes.append(({},))  # a scalar: nothing dynamic (a tuple, like the varargs it describes)
    in_names, out_names = io_names(n, wrapper.kv_cache)
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, tuple(args), dynamic_shapes=tuple(shapes), input_names=in_names,
                                        output_names=out_names, opset_version=opset, dynamo=True,
                                        optimize=optimize, report=False, verbose=False)
    finally:
        noisy.setLevel(level)
    size = sum(p.numel() * p.element_size() for p in wrapper.model.parameters())
    external = size > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    return external


# -- parity ------------------------------------------------------------------------------

@torch.no_grad()
def eager_steps(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int, *, kv_cache: bool = True,
                strength: float | None = None, steer: bool = True) -> dict:
    """PyTorch reference: prefill + ``steps`` greedy steps, last-position logits of each forward."""
    from transformers import DynamicCache

    from .steering import generation_session, steering_disabled, strength_override

    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    pos = position_ids_from_mask(mask)
    logits, gates = [], None
    with generation_session(model) as ctx:
        ov = strength_override(model, strength) if strength is not None else contextlib.nullcontext()
        off = steering_disabled(model) if not steer else contextlib.nullcontext()
        with ov, off:
            cache = DynamicCache(config=model.config) if kv_cache else None
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=kv_cache,
                        logits_to_keep=1)
            logits.append(out.logits[:, -1].float().cpu())
            if ADAPTER_NAME in ctx.gates:
                gates = ctx.gates[ADAPTER_NAME].float().cpu()
            all_ids, tokens = ids, []
            for _ in range(steps):
                nxt = logits[-1].argmax(-1).to(device)
                tokens.append(nxt.cpu())
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                pos = torch.cat([pos, pos[:, -1:] + 1], 1)
                all_ids = torch.cat([all_ids, nxt[:, None]], 1)
                if kv_cache:
                    out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, -1:],
                                cache=out.cache, use_cache=True, logits_to_keep=1)
                else:
                    out = model(input_ids=all_ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                logits_to_keep=1)
                logits.append(out.logits[:, -1].float().cpu())
    return {"logits": logits, "tokens": torch.stack(tokens, 1) if tokens else torch.zeros((ids.shape[0], 0)),
            "gate": gates}


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Run the PyTorch reference with transformers' "eager" attention (explicit softmax(QKᵀ)V, the
    math the exported graph contains). Measured on SmolLM2: sdpa and eager attention differ by
    up to 6.9e-5 in PyTorch itself, the same order as onnxruntime vs PyTorch (bench/RESULTS.md)."""
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, v in zip(configs, saved):
            c._attn_implementation = v


def check_parity(model: nn.Module, tokenizer, runner, *, prompts: Sequence[str] = PARITY_PROMPTS,
                 steps: int = 16, strength: float | None = None, tolerance: float = DEFAULT_TOLERANCE,
                 rtol: float = DEFAULT_RTOL) -> dict:
    """onnxruntime vs PyTorch eager on one left-padded batch; raises FSteerError beyond the bound.

    The bound on max |Δlogits| is ``tolerance + rtol · max |logits|`` (the reference's largest logit
    over the whole check): 1e-4 for small logits, a little more for models whose logits reach tens,
    where fp32 rounding alone moves PyTorch's own logits by ~1e-4 (sdpa vs eager attention, 1 vs 2
    threads). ``rtol=0`` gives the plain absolute bound. Greedy tokens must match exactly, and the
    gate values (in [0, 1]) within ``tolerance``.
    """
    from .activations import encode_prompt, pad_left

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    ids, mask = pad_left(encoded, tokenizer.pad_token_id, "cpu")
    lam = runner.default_strength if strength is None else float(strength)
    with eager_attention(model):  # the graph computes softmax(QKᵀ)V explicitly: compare like with like
        ref = eager_steps(model, ids, mask, steps, kv_cache=runner.kv_cache, strength=lam)
    got = runner.steps(ids.numpy(), mask.numpy(), steps, strength=lam, record_logits=True)
    prefill = float(np.abs(got["logits"][0] - ref["logits"][0].numpy()).max())
    decode, agree_steps = 0.0, 0
    same = bool(np.array_equal(got["tokens"], ref["tokens"].numpy()))
    for step in range(steps):
        if not np.array_equal(got["tokens"][:, step], ref["tokens"][:, step].numpy()):
            break
        agree_steps += 1
        decode = max(decode, float(np.abs(got["logits"][step + 1] - ref["logits"][step + 1].numpy()).max()))
    gate_diff = float(np.abs(got["gate"] - ref["gate"].numpy()).max()) if ref["gate"] is not None else None
    # λ = 0 must be exactly the unsteered model
    with eager_attention(model):
        base = eager_steps(model, ids, mask, 0, kv_cache=runner.kv_cache, steer=False)
    zero = runner.steps(ids.numpy(), mask.numpy(), 0, strength=0.0, record_logits=True)
    unsteered = float(np.abs(zero["logits"][0] - base["logits"][0].numpy()).max())
    steered_shift = float(np.abs(ref["logits"][0] - base["logits"][0]).max())
    scale = max(float(torch.stack(ref["logits"]).abs().max()), float(base["logits"][0].abs().max()))
    bound = tolerance + rtol * scale
    parity = {"prompts": len(prompts), "padded_width": int(ids.shape[1]),
              "padding": [int(ids.shape[1] - len(e)) for e in encoded], "strength": lam,
              "decode_steps": steps, "tolerance": tolerance, "rtol": rtol, "max_abs_logit": scale,
              "bound": bound,
              "prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode,
              "greedy_tokens_identical": same, "token_agreement": agree_steps / steps if steps else 1.0,
              "gate_max_abs_diff": gate_diff,
              "gates_eager": None if ref["gate"] is None else [round(float(g), 6) for g in ref["gate"]],
              "unsteered_prefill_max_abs_diff": unsteered, "steering_logit_shift": steered_shift,
              "reference_attention": "eager"}
    worst = max(prefill, decode, unsteered)
    gate_bad = gate_diff is not None and not gate_diff <= tolerance
    if not same or not worst <= bound or gate_bad:
        where = [] if same else [f"greedy tokens differ from step {agree_steps + 1} of {steps}"]
        where.append(f"max |Δlogits| prefill {prefill:.3g}, decode {decode:.3g}, λ=0 {unsteered:.3g} (bound "
                     f"{bound:.3g} = {tolerance:g} + {rtol:g}·{scale:.3g}), max |Δgate| "
                     f"{gate_diff if gate_diff is not None else 0:.3g}")
        raise FSteerError("ONNX parity check failed: " + "; ".join(where),
                          "nothing was written; re-run with --debug and report the model type")
    return parity


# -- the public entry point ----------------------------------------------------------------

def _resolve_model(model, trust_remote_code: bool) -> tuple[LoadedModel, bool]:
    if isinstance(model, LoadedModel):
        return model, False
    if isinstance(model, (str, Path)):
        from .models import load_model
        return load_model(str(model), dtype="float32", device="cpu", trust_remote_code=trust_remote_code), True
    raise FSteerError(f"export_onnx needs a model name, folder or LoadedModel, got {type(model).__name__}",
                      "pass a model name/folder or fsteer_export.models.LoadedModel")


def _check_opset(opset: int | None) -> None:
    if opset is None:
        return
    import onnx.defs
    top = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= top:
        raise FSteerError(f"--opset {opset!r} is not supported", f"use an opset from {MIN_OPSET} to {top}")


def steered_examples(model: nn.Module, tokenizer, adapter_dir: Path, k: int = 2) -> list[str]:
    """Up to ``k`` of the adapter's own validation prompts (training_report.json) on which its gate
    fires, so the parity check always covers steered rows: the fixed prompts alone can all get
    g = 0 (measured on SmolLM2 safety adapters), and then only the unsteered path would be checked."""
    from .generate import generate

    try:
        report = json.loads((adapter_dir / "training_report.json").read_text(encoding="utf-8"))
        prompts = [p for p in report.get("validation_prompts", []) if isinstance(p, str) and p.strip()][:24]
    except (OSError, ValueError, AttributeError):
        return []
    if not prompts:
        return []
    outs = generate(model, tokenizer, prompts, max_new_tokens=1, batch_size=8, desc="parity: gated prompts")
    fired = sorted((o for o in outs if (o.gate or 0.0) > 0.0), key=lambda o: -float(o.gate))
    return [o.prompt for o in fired[:k]]


def export_onnx(model: str | Path | LoadedModel, adapter_dir: str | Path, out: str | Path, opset: int | None = None,
                kv_cache: bool = True, overwrite: bool = False, *, strength: float | None = None,
                decode_steps: int = 16, tolerance: float = DEFAULT_TOLERANCE, rtol: float = DEFAULT_RTOL,
                parity_prompts: Sequence[str] = PARITY_PROMPTS, optimize: bool = True,
                trust_remote_code: bool = False) -> OnnxExport:
    """Export base model + FineSteer adapter to ``out`` (model.onnx, config, tokenizer, fsteer_onnx.json).

    ``model``: a name/folder/alias (loaded in float32 on the CPU) or a :class:`LoadedModel` without
    steering attached (the adapter is attached for the export and removed again). ``strength`` sets
    the default λ recorded in the folder (the adapter's λ otherwise); λ stays a graph input.
    ``decode_steps`` greedy steps on ``parity_prompts`` (one left-padded batch) are checked against
    PyTorch eager: max |Δlogits| ≤ ``tolerance + rtol · max |logits|``, identical greedy tokens, and
    λ = 0 against the unsteered model (see :func:`check_parity`); otherwise FSteerError and nothing
    at ``out``. ``optimize`` runs the onnxscript graph optimiser (default; a little slower export).
    """
    from .adapter import atomic_folder, check_output_folder, read_config
    from .steering import remove_steering, steering_layers

    _check_opset(opset)
    check_output_folder(out, overwrite)  # before any loading: fail fast, write nothing
    if decode_steps < 1:
        raise FSteerError(f"decode_steps must be ≥ 1, got {decode_steps}", "check at least one decode step")
    if not parity_prompts:
        raise FSteerError("no parity prompts", "pass at least one prompt (two of different lengths test padding)")
    cfg = read_config(adapter_dir)  # a clear error for a missing/broken adapter before anything is loaded
    lm, owned = _resolve_model(model, trust_remote_code)
    net = lm.model
    if steering_layers(net):
        raise FSteerError("the model passed to export_onnx already has steering layers attached",
                          "pass the plain base model; export_onnx loads the adapter itself")
    dtypes = {p.dtype for p in net.parameters()}
    if dtypes != {torch.float32}:
        raise FSteerError(f"ONNX export needs a float32 model, this one has {sorted(map(str, dtypes))}",
                          "load the model with --dtype float32")
    t0 = time.perf_counter()
    with atomic_folder(out, overwrite) as tmp:
        from .adapter import config_dict, load_adapter
        try:
            head = load_adapter(net, adapter_dir, name=ADAPTER_NAME, strength=strength)
            lam = float(head.strength)
            if tuple(parity_prompts) == PARITY_PROMPTS:
                parity_prompts = list(parity_prompts) + steered_examples(net, lm.tokenizer, Path(adapter_dir))
            n_layers = len(decoder_layers(net))
            kv = _kv_shapes(net) if kv_cache else []
            if kv_cache and len(kv) != n_layers:
                raise FSteerError(f"{model_type(net)} has {len(kv)} KV-cache layers for {n_layers} decoder layers",
                                  "export with --no-kv-cache")
            wrapper = SteeredGraph(net, n_layers, kv_cache).eval()
            vocab = int(net.get_output_embeddings().weight.shape[0])
            path = tmp / ONNX_NAME
            try:
                external = _export_graph(wrapper, kv, hidden_size(net), vocab, path, opset, optimize)
            except FSteerError:
                raise
            except Exception as exc:
                raise FSteerError(f"torch.onnx.export of {model_type(net)} failed: {_summary(exc)}",
                                  "re-run with --debug for the full trace; try --no-kv-cache") from exc
            export_s = time.perf_counter() - t0
            timings = {"torch_onnx_export": round(export_s, 2)}
            import onnx
            t1 = time.perf_counter()
            try:
                onnx.checker.check_model(str(path))
            except Exception as exc:
                raise FSteerError(f"onnx.checker rejected the exported graph: {str(exc).splitlines()[0][:300]}",
                                  "re-run with --debug and report the model type") from exc
            timings["onnx_checker"] = round(time.perf_counter() - t1, 2)
            net.config.save_pretrained(tmp)
            gen = getattr(net, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
            graph = onnx.load(str(path), load_external_data=False)
            in_names, out_names = io_names(n_layers, kv_cache)
            meta = {
                "format": "fsteer-onnx", "format_version": EXPORT_FORMAT, "onnx_file": ONNX_NAME,
                "external_data": sorted(p.name for p in tmp.iterdir() if p.name.startswith(ONNX_NAME + "."))
                if external else [],
                "opset": next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None),
                "kv_cache": kv_cache, "logits": "last position",
                "inputs": in_names, "outputs": out_names,
                "num_layers": n_layers, "hidden_size": hidden_size(net), "vocab_size": vocab,
                "kv_heads": [h for h, _ in kv], "head_dims": [d for _, d in kv],
                "dtype": "float32", "model_type": model_type(net), "base_model": lm.name,
                "adapter_name": ADAPTER_NAME, "adapter_source": str(adapter_dir),
                "adapter_config": json.loads(json.dumps(config_dict(cfg), default=str)),
                "default_strength": lam, "pad_token_id": lm.tokenizer.pad_token_id,
                "torch_version": torch.__version__, "optimized": optimize,
            }
            _write_meta(tmp, meta)
            from .onnx_runtime import OnnxSteeredModel
            t1 = time.perf_counter()
            runner = OnnxSteeredModel(tmp, provider="CPUExecutionProvider")
            timings["onnxruntime_session"] = round(time.perf_counter() - t1, 2)
            t1 = time.perf_counter()
            parity = check_parity(net, lm.tokenizer, runner, prompts=parity_prompts, steps=decode_steps,
                                  tolerance=tolerance, rtol=rtol)
            import onnxruntime
            meta["parity"] = {**parity, "onnxruntime_version": onnxruntime.__version__,
                              "provider": "CPUExecutionProvider"}
            timings["parity_check"] = round(time.perf_counter() - t1, 2)
            timings["total"] = round(time.perf_counter() - t0, 2)
            meta["export_seconds"] = timings["total"]
            meta["timings_s"] = timings
            _write_meta(tmp, meta)
            del runner
        finally:
            if not owned:
                remove_steering(net)
    return OnnxExport(Path(out), meta["parity"], meta["export_seconds"], meta)


def _summary(exc: BaseException) -> str:
    """One line from a torch.onnx error (its "Exception summary" when it has one)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    summary = next((ln for ln in lines if ln.startswith("<class '")), None)
    if summary is None and exc.__cause__ is not None:
        return _summary(exc.__cause__)
    return (summary or (lines[0] if lines else type(exc).__name__))[:300]


def _write_meta(folder: Path, meta: dict) -> None:
    (folder / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n")
