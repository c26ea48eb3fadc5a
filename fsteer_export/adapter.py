"""The adapter folder, in PEFT's layout: adapter_config.json + adapter_model.safetensors + README.md.

Tensor keys are the ones a PEFT tuner produces (``base_model.model.<layer path>.fsteer.<tensor>``,
adapter name stripped), so the same folder loads with our loader and with
``PeftModel.from_pretrained``. Loading never unpickles: safetensors only, every key, shape,
dtype and value checked before anything is attached to the model. Saving is atomic.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FORMAT_VERSION, PEFT_TYPE_NAME, FineSteerConfig
from .errors import FSteerError
from .models import _LAYER_PATHS, model_type
from .steering import ADAPTER_ATTR, FineSteerHead, add_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
UNSAFE_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth",
                  "adapter_model.ckpt", "adapter_model.pkl")
PREFIX = "base_model.model."


def layer_prefix(cfg: FineSteerConfig) -> str:
    path = _LAYER_PATHS.get(cfg.base_model_type, "model.layers")
    return f"{PREFIX}{path}.{cfg.layer}.{ADAPTER_ATTR}."


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False):
    """Yield a temp folder next to ``out``; on success it replaces ``out``; on any error it vanishes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FSteerError(f"output folder {out} already exists", "pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise FSteerError(f"output path {out} exists and is not a folder", "choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise FSteerError(f"cannot write to {parent}: {exc.strerror}", "choose a writable --out") from exc
    try:
        yield tmp
        if out.exists():
            backup = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FSteerError(f"writing {out} failed: {exc.strerror or exc}", "check free disk space and permissions") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def config_dict(cfg: FineSteerConfig) -> dict:
    d = cfg.to_dict()
    d["peft_type"] = PEFT_TYPE_NAME
    return d


def write_adapter_files(folder: Path, cfg: FineSteerConfig, head: FineSteerHead,
                        card: str | None = None) -> None:
    """Write config + weights (+ card) into an existing folder (the caller makes it atomic)."""
    prefix = layer_prefix(cfg)
    tensors = {prefix + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "fsteer_format": str(FORMAT_VERSION)})
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

def read_config(folder: str | Path) -> FineSteerConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise FSteerError(f"adapter folder {folder} does not exist", "pass the folder written by fsteer train")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FSteerError(f"{folder} has no {CONFIG_NAME}: it is not an adapter folder",
                          "pass the folder written by fsteer train")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FSteerError(f"{path} is not valid JSON ({exc})", "re-save the adapter with fsteer train") from exc
    if not isinstance(raw, dict):
        raise FSteerError(f"{path} does not hold a JSON object", "re-save the adapter")
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
    types = {"layer": int, "gate_layer": int, "hidden_size": int, "gate_rank": int, "calib_size": int,
             "experts": int, "residual_rank": int, "key_dim": int, "mlp_hidden": int, "base_num_layers": int,
             "strength": (int, float), "gate_kind": str, "base_model_type": str}
    for key, typ in types.items():
        if key not in kwargs:
            raise FSteerError(f"{path} is missing the field {key!r}", "re-save the adapter with fsteer train")
        value = kwargs[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise FSteerError(f"{path} field {key!r} has the wrong type ({type(value).__name__}: {value!r})",
                              "re-save the adapter with fsteer train")
        if typ is int and value < (0 if key in ("layer", "gate_layer") else 1):
            raise FSteerError(f"{path} field {key!r} is out of range ({value})", "re-save the adapter")
    if not torch.isfinite(torch.tensor(float(kwargs["strength"]))):
        raise FSteerError(f"{path} field 'strength' is not finite", "set a finite strength")
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
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FSteerError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                          "re-save the adapter with fsteer train") from exc
    prefix = layer_prefix(cfg)
    state = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    expected = {k: v.shape for k, v in FineSteerHead(cfg).state_dict().items()}
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
    params = sum(v.numel() for v in FineSteerHead(cfg).state_dict().values())
    return {"base_model": cfg.base_model_name_or_path, "model_type": cfg.base_model_type,
            "hidden_size": cfg.hidden_size, "num_layers": cfg.base_num_layers, "task": cfg.task,
            "layer": cfg.layer, "gate_layer": cfg.gate_layer, "gate_kind": cfg.gate_kind,
            "gate_rank": cfg.gate_rank, "eps": cfg.training.get("eps") if cfg.training else None,
            "calibration_scores": cfg.calib_size, "experts": cfg.experts, "residual_rank": cfg.residual_rank,
            "key_dim": cfg.key_dim, "strength": cfg.strength, "tensor_values": params, "files": files,
            "format_version": cfg.format_version}
