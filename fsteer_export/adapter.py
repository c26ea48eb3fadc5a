"""The adapter folder, in PEFT's layout: adapter_config.json + adapter_model.safetensors + README.md.

Tensor keys are the ones a PEFT tuner produces (``base_model.model.<layer path>.fsteer.<tensor>``,
adapter name stripped), so the same folder loads with our loader and with
``PeftModel.from_pretrained``. Loading never unpickles: safetensors only, every key, shape,
dtype and value checked before anything is attached to the model. Saving is atomic.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import FORMAT_VERSION, GATE_POOLS, PEFT_TYPE_NAME, FineSteerConfig
from .errors import FSteerError, read_json_object
from .models import _LAYER_PATHS
from .steering import ADAPTER_ATTR, FineSteerHead, add_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
UNSAFE_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth",
                  "adapter_model.ckpt", "adapter_model.pkl")
PREFIX = "base_model.model."


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def save_file(tensors: dict[str, torch.Tensor], filename: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with a reproducible header.

    The Rust writer serialises the metadata from a hash map, so its key order (and the file's bytes)
    changes from one save to the next; here tensors and metadata are written in sorted order, so the
    same adapter always gives the same bytes. The format is plain safetensors (8-byte header length,
    JSON header padded to 8 bytes, then the raw little-endian data).
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in blobs:
            f.write(data)


def layer_prefix(cfg: FineSteerConfig) -> str:
    path = _LAYER_PATHS.get(cfg.base_model_type, "model.layers")
    return f"{PREFIX}{path}.{cfg.layer}.{ADAPTER_ATTR}."


def check_output_folder(out: str | Path, overwrite: bool = False) -> None:
    """Fail before any long work if ``out`` cannot be written: it exists (without ``overwrite``),
    is a file, or its parent folder cannot be created or written to. Leaves nothing behind."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FSteerError(f"output folder {out} already exists", "pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise FSteerError(f"output path {out} exists and is not a folder", "choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "it" if existing == parent else str(existing)
        raise FSteerError(f"cannot write to {parent}: {where} is a file, not a folder", "choose a writable --out")
    if parent.exists():
        try:
            Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)).rmdir()
        except OSError as exc:
            raise FSteerError(f"cannot write to {parent}: {_os_reason(exc)}", "choose a writable --out") from exc
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise FSteerError(f"cannot create {parent}: {existing} is not writable", "choose a writable --out")


def _os_reason(exc: OSError) -> str:
    if exc.strerror:
        return exc.strerror
    if isinstance(exc.errno, int):
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False):
    """Yield a temp folder next to ``out``; on success it replaces ``out``; on any error it vanishes."""
    out = Path(out)
    check_output_folder(out, overwrite)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise FSteerError(f"cannot write to {parent}: {_os_reason(exc)}", "choose a writable --out") from exc
    try:
        yield tmp
        if out.exists():
            backup = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, backup)
            try:
                os.replace(tmp, out)
            except BaseException:  # put the old folder back: --overwrite never loses it
                os.replace(backup, out)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FSteerError(f"writing {out} failed ({_os_reason(exc)}); nothing was written",
                          "free some disk space or check permissions, then run again") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def config_dict(cfg: FineSteerConfig) -> dict:
    d = cfg.to_dict()
    d["peft_type"] = PEFT_TYPE_NAME
    return d


# Fields that change what the tensors mean without changing their shapes: covered by the checksum.
_DIGEST_FIELDS = ("layer", "gate_layer", "gate_kind", "hidden_size", "base_model_type", "base_num_layers")
DIGEST_KEY = "fsteer_sha256"


def weights_digest(state: dict[str, torch.Tensor], cfg: FineSteerConfig) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and the fields in ``_DIGEST_FIELDS``.

    Stored in the safetensors metadata; a flipped bit in a value, or an edited layer / gate kind in
    adapter_config.json, then fails loudly instead of steering with corrupted numbers.
    """
    h = hashlib.sha256()
    fields = {k: getattr(cfg, k) for k in _DIGEST_FIELDS}
    if cfg.gate_pool != "last":  # added later: adapters saved before it keep their checksum
        fields["gate_pool"] = cfg.gate_pool
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def expected_shapes(cfg: FineSteerConfig) -> dict[str, tuple[int, ...]]:
    """Tensor shapes the config implies, built on the meta device (a corrupted size allocates nothing)."""
    try:
        with torch.device("meta"):
            head = FineSteerHead(cfg)
    except FSteerError:
        raise
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:  # e.g. a size beyond int64
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FSteerError(f"the sizes in the adapter config cannot build a FineSteer head ({first})",
                          "re-save the adapter with fsteer train") from exc
    return {k: tuple(v.shape) for k, v in head.state_dict().items()}


def write_adapter_files(folder: Path, cfg: FineSteerConfig, head: FineSteerHead,
                        card: str | None = None) -> None:
    """Write config + weights (+ card) into an existing folder (the caller makes it atomic)."""
    prefix = layer_prefix(cfg)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    tensors = {prefix + k: v for k, v in state.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "fsteer_format": str(FORMAT_VERSION),
                                                             DIGEST_KEY: weights_digest(state, cfg)})
    (folder / CONFIG_NAME).write_text(json.dumps(config_dict(cfg), indent=2, sort_keys=True, default=str) + "\n")
    if card is not None:
        (folder / "README.md").write_text(card)


def save_adapter(out: str | Path, cfg: FineSteerConfig, head: FineSteerHead, *, report: dict | None = None,
                 overwrite: bool = False, plots: bool = True) -> Path:
    from .card import model_card

    with atomic_folder(out, overwrite) as tmp:
        write_adapter_files(tmp, cfg, head, model_card(cfg, report))
        if report is not None:
            (tmp / "training_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
            if plots:
                from .plots import training_plots
                training_plots(report, tmp)
    return Path(out)


# -- loading -----------------------------------------------------------------------------

_FIELD_TYPES = {"layer": int, "gate_layer": int, "hidden_size": int, "gate_rank": int, "calib_size": int,
                "experts": int, "residual_rank": int, "key_dim": int, "mlp_hidden": int, "base_num_layers": int,
                "strength": (int, float), "gate_kind": str, "base_model_type": str}


def check_config_fields(values: dict, where: str) -> None:
    """Types and ranges of the structural fields; shared by our loader and the PEFT tuner."""
    for key, typ in _FIELD_TYPES.items():
        if key not in values:
            raise FSteerError(f"{where} is missing the field {key!r}", "re-save the adapter with fsteer train")
        value = values[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise FSteerError(f"{where} field {key!r} has the wrong type ({type(value).__name__}: {value!r})",
                              "re-save the adapter with fsteer train")
        if typ is int and value < (0 if key in ("layer", "gate_layer") else 1):
            raise FSteerError(f"{where} field {key!r} is out of range ({value})", "re-save the adapter")
    pool = values.get("gate_pool", "last")
    if pool not in GATE_POOLS:
        raise FSteerError(f"{where} field 'gate_pool' is {pool!r}, not one of {', '.join(GATE_POOLS)}",
                          "re-save the adapter with fsteer train")
    try:
        finite = math.isfinite(float(values["strength"]))
    except OverflowError:  # an integer beyond float range
        finite = False
    if not finite:
        raise FSteerError(f"{where} field 'strength' is not finite", "set a finite strength")


def read_config(folder: str | Path) -> FineSteerConfig:
    folder = Path(folder)
    path, raw = read_json_object(folder, CONFIG_NAME, what="adapter folder",
                                 missing=f"{folder} has no {CONFIG_NAME}: it is not an adapter folder",
                                 fix="pass the folder written by fsteer train",
                                 redo="re-save the adapter with fsteer train")
    ptype = raw.get("peft_type")
    if ptype != PEFT_TYPE_NAME:
        raise FSteerError(f"{path} has peft_type {ptype!r}, not {PEFT_TYPE_NAME!r}",
                          "this is not a FineSteer adapter; load it with peft directly")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise FSteerError(f"{path} has format_version {version!r}; this fsteer_export reads {FORMAT_VERSION}",
                          "upgrade fsteer_export or re-train the adapter")
    known = set(FineSteerConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in raw.items() if k in known and k != "peft_type"}
    check_config_fields(kwargs, str(path))
    for key, typ in (("training", dict), ("task", str)):
        if key in kwargs and not isinstance(kwargs[key], typ):
            raise FSteerError(f"{path} field {key!r} has the wrong type ({type(kwargs[key]).__name__}: {kwargs[key]!r:.40})",
                              "re-save the adapter with fsteer train")
    try:
        return FineSteerConfig(**kwargs)
    except Exception as exc:  # malformed values that the dataclass rejects
        raise FSteerError(f"{path} is not a valid FineSteer config ({exc})", "re-save the adapter") from exc


def read_weights(folder: str | Path, cfg: FineSteerConfig) -> dict[str, torch.Tensor]:
    """The head's tensors, validated against the shapes the config implies."""
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        unsafe = [n for n in UNSAFE_WEIGHTS if (folder / n).exists()]
        if unsafe:
            raise FSteerError(f"{folder} holds {unsafe[0]}, a pickle-based weights file, which is never loaded",
                              f"convert it to {WEIGHTS_NAME} in a trusted environment")
        raise FSteerError(f"{folder} has no {WEIGHTS_NAME}", "re-save the adapter with fsteer train")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise FSteerError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                          "re-save the adapter with fsteer train") from exc
    prefix = layer_prefix(cfg)
    state = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise FSteerError(f"{path} lacks tensor {prefix + missing[0]} ({len(missing)} missing)",
                          "the weights do not match adapter_config.json; re-save the adapter")
    unexpected = sorted(set(raw) - {prefix + k for k in expected})
    if unexpected:
        raise FSteerError(f"{path} has an unexpected tensor {unexpected[0]}",
                          "the weights do not match adapter_config.json; re-save the adapter")
    for k, shape in expected.items():
        t = state[k]
        if tuple(t.shape) != tuple(shape):
            raise FSteerError(f"tensor {prefix + k} has shape {tuple(t.shape)}, expected {tuple(shape)}",
                              "the weights do not match adapter_config.json; re-save the adapter")
        if not t.is_floating_point():
            raise FSteerError(f"tensor {prefix + k} has dtype {t.dtype}, expected a floating type",
                              "re-save the adapter with fsteer train")
        if not torch.isfinite(t).all():
            raise FSteerError(f"tensor {prefix + k} contains NaN or Inf values", "re-train the adapter")
    stored = metadata.get(DIGEST_KEY)
    if stored is not None and stored != weights_digest({k: state[k] for k in expected}, cfg):
        raise FSteerError(f"{path} fails its checksum: the weights (or layer / gate fields of {CONFIG_NAME}) "
                          "changed after saving", "the adapter is corrupted; copy it again or re-train it")
    return {k: state[k].float() for k in expected}


def load_adapter(model: nn.Module, folder: str | Path, name: str = "default",
                 strength: float | None = None) -> FineSteerHead:
    """Validate an adapter folder and attach it to ``model`` (a plain transformers causal LM)."""
    cfg = read_config(folder)
    if strength is not None:
        cfg.strength = strength
    from .steering import check_compatible
    check_compatible(model, cfg, where=f"adapter {folder}")
    state = read_weights(folder, cfg)
    return add_adapter(model, cfg, name=name, state=state)


def adapter_summary(folder: str | Path) -> dict:
    """What ``fsteer inspect`` prints: model, layers, sizes."""
    folder = Path(folder)
    cfg = read_config(folder)
    read_weights(folder, cfg)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    params = sum(math.prod(shape) for shape in expected_shapes(cfg).values())
    return {"base_model": cfg.base_model_name_or_path, "model_type": cfg.base_model_type,
            "hidden_size": cfg.hidden_size, "num_layers": cfg.base_num_layers, "task": cfg.task,
            "layer": cfg.layer, "gate_layer": cfg.gate_layer, "gate_kind": cfg.gate_kind,
            "gate_pool": cfg.gate_pool, "gate_rank": cfg.gate_rank, "eps": cfg.training.get("eps") if cfg.training else None,
            "calibration_scores": cfg.calib_size, "experts": cfg.experts, "residual_rank": cfg.residual_rank,
            "key_dim": cfg.key_dim, "strength": cfg.strength, "tensor_values": params, "files": files,
            "format_version": cfg.format_version}
