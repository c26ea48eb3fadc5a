"""Run an exported steered model with onnxruntime: batched, left-padded, chat-templated generation.

The folder written by :func:`fsteer_export.onnx_export.export_onnx` is self-contained: the graph,
``config.json``, the tokenizer files and ``fsteer_onnx.json`` (inputs/outputs, settings, parity).
Greedy decoding follows Hugging Face ``generate`` step for step (positions from the attention
mask, finished rows padded with ``pad_token_id``, stop when every row has produced an EOS), so
its completions equal the PyTorch eager ones from :func:`fsteer_export.generate.generate`.
Sampling (temperature, top-p) uses numpy's generator: seeded, but not the same draws as torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import FSteerError, read_json_object
from .generate import Completion

META_NAME = "fsteer_onnx.json"
FORMAT_VERSION = 1
_PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "gpu": "CUDAExecutionProvider",
                     "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider",
                     "dml": "DmlExecutionProvider", "openvino": "OpenVINOExecutionProvider"}


def read_meta(folder: str | Path) -> dict:
    """``fsteer_onnx.json`` of an export folder, with a clear error for anything else."""
    folder = Path(folder)
    path, meta = read_json_object(folder, META_NAME, what="ONNX folder",
                                  missing=f"{folder} is not an fsteer ONNX export (no {META_NAME})",
                                  fix="pass the folder written by fsteer export onnx", redo="re-run fsteer export onnx")
    if meta.get("format") != "fsteer-onnx":
        raise FSteerError(f"{path} does not describe an fsteer ONNX export", "re-run fsteer export onnx")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FSteerError(f"{path} has format_version {meta.get('format_version')!r}; this fsteer_export reads "
                          f"{FORMAT_VERSION}", "upgrade fsteer_export or re-export")
    for key in ("onnx_file", "kv_cache", "inputs", "outputs", "num_layers", "hidden_size", "default_strength"):
        if key not in meta:
            raise FSteerError(f"{path} is missing the field {key!r}", "re-run fsteer export onnx")
    if not (folder / meta["onnx_file"]).is_file():
        raise FSteerError(f"{folder} has no {meta['onnx_file']}", "re-run fsteer export onnx")
    return meta


def choose_provider(provider: str | None) -> str:
    """The execution provider: the one asked for (checked), else CUDA when available, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider is None:
        return "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"
    name = _PROVIDER_ALIASES.get(provider.lower(), provider)
    if name not in available:
        raise FSteerError(f"onnxruntime execution provider {provider!r} is not available here "
                          f"(available: {', '.join(available)})",
                          "install onnxruntime-gpu for CUDAExecutionProvider, or pass --provider cpu")
    return name


# onnxruntime graph optimization levels. "basic" (constant folding, redundant-node removal) is the
# default: the "extended"/"all" fusions (layer norms, attention, GELU) re-associate fp32 sums and
# moved SmolLM2's steered decode logits by 1.5e-4 vs PyTorch, against 9.2e-5 with "basic"
# (bench/RESULTS.md), with no measured speed gain on CPU.
OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                       "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
DEFAULT_OPTIMIZATION = "basic"


class OnnxSteeredModel:
    """A loaded export: ``generate`` for text, ``steps`` for token-level control (parity checks)."""

    def __init__(self, folder: str | Path, provider: str | None = None, threads: int | None = None,
                 optimization: str = DEFAULT_OPTIMIZATION) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        from .models import prepare_tokenizer

        if optimization not in OPTIMIZATION_LEVELS:
            raise FSteerError(f"unknown onnxruntime optimization level {optimization!r}",
                              f"use one of {', '.join(OPTIMIZATION_LEVELS)}")
        self.optimization = optimization
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.provider = choose_provider(provider)
        self.kv_cache = bool(self.meta["kv_cache"])
        self.num_layers = int(self.meta["num_layers"])
        self.hidden_size = int(self.meta["hidden_size"])
        self.default_strength = float(self.meta["default_strength"])
        self.kv_heads = list(self.meta.get("kv_heads") or [])
        self.head_dims = list(self.meta.get("head_dims") or [])
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        except (OSError, ValueError) as exc:
            raise FSteerError(f"{self.folder} has no usable tokenizer files ({str(exc).splitlines()[0][:200]})",
                              "re-run fsteer export onnx") from exc
        prepare_tokenizer(self.tokenizer)
        self.eos_ids, self.max_positions = self._read_configs()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization])
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        providers = [self.provider] if self.provider == "CPUExecutionProvider" else [self.provider,
                                                                                      "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.folder / self.meta["onnx_file"]), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise FSteerError(f"onnxruntime cannot load {self.folder / self.meta['onnx_file']}: "
                              f"{str(exc).splitlines()[0][:300]}", "re-run fsteer export onnx") from exc
        names = {i.name for i in self.session.get_inputs()}
        missing = [n for n in self.meta["inputs"] if n not in names]
        if missing:
            raise FSteerError(f"the graph in {self.folder} lacks the input {missing[0]!r} that {META_NAME} lists",
                              "re-run fsteer export onnx")
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def _read_configs(self) -> tuple[list[int], int]:
        cfg = {}
        if (self.folder / "config.json").is_file():
            cfg = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        eos = None
        if (self.folder / "generation_config.json").is_file():
            eos = json.loads((self.folder / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
        if eos is None:
            eos = cfg.get("eos_token_id", self.tokenizer.eos_token_id)
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        limit = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
        return eos_ids, int(limit)

    # -- one forward ---------------------------------------------------------------------
    def _ortvalue(self, array: np.ndarray):
        import onnxruntime as ort
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _run(self, feeds: dict) -> dict:
        """Run with IO binding: outputs stay ORT values (KV cache, state) so they can be fed back."""
        io = self.session.io_binding()
        keep = []  # an OrtValue made from numpy borrows its buffer: keep both alive through the run
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                value = self._ortvalue(value)
                keep.append(value)
            io.bind_ortvalue_input(name, value)
        for out in self.meta["outputs"]:  # logits and gate are read on the host; the rest is fed back
            io.bind_output(out, "cpu" if out in ("logits", "gate") else self.device)
        self.session.run_with_iobinding(io)
        del keep
        return dict(zip(self.meta["outputs"], io.get_outputs()))

    def _empty_past(self, batch: int) -> dict:
        feeds = {}
        for i in range(self.num_layers):
            shape = (batch, int(self.kv_heads[i]), 0, int(self.head_dims[i]))
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = np.zeros(shape, np.float32)
        return feeds

    # -- the decoding loop -------------------------------------------------------------------
    def steps(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, *, strength: float | None = None,
              pick=None, record_logits: bool = False, stop_at_eos: bool = False,
              pad_token_id: int | None = None) -> dict:
        """Prefill a left-padded batch, then ``max_new_tokens`` steps; greedy unless ``pick`` is given.

        Returns ``tokens`` (B, n), ``gate`` (B,), and with ``record_logits`` the last-position logits
        of every forward (prefill first, then one after each new token: n + 1 in all). With
        ``stop_at_eos`` finished rows get ``pad_token_id`` and the loop stops once every row has
        finished, as Hugging Face ``generate`` does.
        """
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.asarray(mask, dtype=np.int64)
        batch = ids.shape[0]
        lam = np.array(self.default_strength if strength is None else strength, dtype=np.float32)
        pick = pick or (lambda logits: logits.argmax(-1))
        pad = self.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        from .onnx_export import position_ids_from_mask

        pos = position_ids_from_mask(mask)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                 "steering_state": np.zeros((batch, self.hidden_size), np.float32), "strength": lam}
        if self.kv_cache:
            feeds.update(self._empty_past(batch))
        else:
            feeds["prefill"] = np.array(True)
        outs = self._run(feeds)
        gate = outs["gate"].numpy().copy()
        state = outs["steering_state_out"]
        logits = outs["logits"].numpy()
        recorded = [logits.copy()] if record_logits else []
        tokens = []
        unfinished = np.ones(batch, dtype=bool)
        all_ids = ids
        for k in range(max_new_tokens):
            nxt = np.asarray(pick(logits), dtype=np.int64)
            if stop_at_eos:
                nxt = np.where(unfinished, nxt, pad)
                unfinished &= ~np.isin(nxt, self.eos_ids)
            tokens.append(nxt)
            if (stop_at_eos and not unfinished.any()) or (k == max_new_tokens - 1 and not record_logits):
                break  # no forward is needed after the last token (parity checks compare that one too)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], 1)
            pos = np.concatenate([pos, pos[:, -1:] + 1], 1)
            if self.kv_cache:
                feeds = {"input_ids": nxt[:, None], "attention_mask": mask, "position_ids": pos[:, -1:],
                         "steering_state": state, "strength": lam}
                for i in range(self.num_layers):
                    for kv in ("key", "value"):
                        feeds[f"past_key_values.{i}.{kv}"] = outs[f"present.{i}.{kv}"]
            else:
                all_ids = np.concatenate([all_ids, nxt[:, None]], 1)
                feeds = {"input_ids": all_ids, "attention_mask": mask, "position_ids": pos,
                         "steering_state": state, "strength": lam, "prefill": np.array(False)}
            outs = self._run(feeds)
            logits = outs["logits"].numpy()
            if record_logits:
                recorded.append(logits.copy())
        out = {"tokens": np.stack(tokens, 1) if tokens else np.zeros((batch, 0), np.int64), "gate": gate}
        if record_logits:
            out["logits"] = recorded
        return out

    # -- text in, text out -----------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 48, batch_size: int = 8,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 strength: float | None = None, desc: str = "generating (onnxruntime)") -> list[Completion]:
        """Same contract as :func:`fsteer_export.generate.generate`: one Completion per prompt, in order."""
        from .activations import encode_prompt, pad_left
        from .progress import track

        if max_new_tokens < 1 or batch_size < 1:
            raise FSteerError("max_new_tokens and batch_size must be ≥ 1", "pass positive values")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise FSteerError(f"sampling needs temperature > 0 and 0 < top_p ≤ 1, got {temperature}, {top_p}",
                              "pass valid sampling settings or use greedy decoding")
        limit = self.max_positions - max_new_tokens
        encoded = [encode_prompt(self.tokenizer, p, max(8, limit)) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        rng = np.random.default_rng(seed)
        pick = _sampler(rng, temperature, top_p) if do_sample else None
        results: list[Completion | None] = [None] * len(prompts)
        name = self.meta.get("adapter_name", "default")
        for start in track(range(0, len(order), batch_size), desc, total=math.ceil(len(order) / batch_size)):
            idx = order[start:start + batch_size]
            ids, mask = pad_left([encoded[i] for i in idx], self.tokenizer.pad_token_id, "cpu")
            out = self.steps(ids.numpy(), mask.numpy(), max_new_tokens, strength=strength, pick=pick,
                             stop_at_eos=True)
            for row, i in enumerate(idx):
                text = self.tokenizer.decode(out["tokens"][row].tolist(), skip_special_tokens=True)
                g = float(out["gate"][row])
                results[i] = Completion(prompts[i], text, gate=g, gates={name: g})
        return results  # type: ignore[return-value]


def _sampler(rng: np.random.Generator, temperature: float, top_p: float):
    def pick(logits: np.ndarray) -> np.ndarray:
        z = logits.astype(np.float64) / temperature
        z -= z.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
        if top_p < 1.0:
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, -1)
            keep = np.cumsum(sorted_p, -1) - sorted_p < top_p  # always keeps the top token
            drop = np.zeros_like(keep)
            np.put_along_axis(drop, order, ~keep, -1)
            p = np.where(drop, 0.0, p)
            p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)
    return pick
