"""FineSteer as a first-class PEFT method.

Importing ``fsteer_export`` registers the ``FINESTEER`` type in PEFT's mappings, so that
``PeftModel.from_pretrained(base, folder)``, ``get_peft_model(base, FineSteerConfig(...))`` and
transformers' ``model.load_adapter(folder)`` build the same :class:`~fsteer_export.steering.SteeringLayer`
wrappers as our own loader. There is no second steering implementation: the tuner only installs,
activates and removes those wrappers, so parity with the eager path holds by construction.

All adapter state lives on the layer wrappers (``<layers>.<L>.fsteer.<adapter>.*``), never on the
tuner: transformers' ``load_adapter`` throws the tuner away after injection.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import FINESTEER, PEFT_TYPE_NAME, FineSteerConfig
from .errors import FSteerError
from .models import hidden_size, model_type, num_layers
from .steering import (ADAPTER_ATTR, SteeringLayer, add_adapter, check_compatible, generation_session,
                       remove_steering, steering_layers)

METHOD_NAME = PEFT_TYPE_NAME.lower()  # register_peft_method wants the lower-case name
PREFIX = ADAPTER_ATTR  # state-dict segment owned by the method: "...layers.L.fsteer.<adapter>...."
IMPORT_HINT = "run `import fsteer_export` before loading: it registers the FINESTEER PEFT method"
_MERGE_PROBLEM = ("a FineSteer adapter cannot be merged into the weights: its gate and vector depend on each "
                  "prompt, so no fixed weight change reproduces it")
_MERGE_FIX = "keep the adapter loaded (PeftModel), or call unload() to get the plain base model back"


def complete_config(cfg: FineSteerConfig, model: nn.Module) -> FineSteerConfig:
    """Fill the fields a fresh ``FineSteerConfig()`` leaves empty from the base model.

    ``get_peft_model(model, FineSteerConfig(layer=...))`` should just work; a loaded adapter has all
    of these set already, so for it this is a no-op and the compatibility check stays meaningful.
    """
    if not cfg.hidden_size:
        cfg.hidden_size = hidden_size(model)
    if not cfg.base_model_type:
        cfg.base_model_type = model_type(model)
    if not cfg.base_num_layers:
        cfg.base_num_layers = num_layers(model)
    if not cfg.calib_size:
        cfg.calib_size = 1  # one score 0 ⇒ F(s) = 1 ⇒ g = 1; with zero experts v = 0: a no-op start
    if cfg.gate_layer is None:
        cfg.gate_layer = cfg.layer
    return cfg


class FineSteerModel(BaseTuner):
    """PEFT tuner: wraps decoder layer L (and the gate layer G) in :class:`SteeringLayer`."""

    prefix: str = PREFIX
    tuner_layer_cls = SteeringLayer
    target_module_mapping: dict[str, list[str]] = {}

    # -- injection ------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Validate the config against the model, then install the head with the shared helper.

        BaseTuner's version matches ``target_modules`` patterns; FineSteer targets exactly one
        decoder layer (plus a gate tap), known from the config, so we do it directly.
        """
        from .adapter import check_config_fields

        source = _transformers_adapter_source()
        if source is not None:  # transformers' load_adapter never calls FineSteerConfig.from_pretrained
            validated_folder(source[0], source[1].get("subfolder") or None, **source[1])
        cfg = self.peft_config[adapter_name]
        if not isinstance(cfg, FineSteerConfig):
            raise FSteerError(f"adapter {adapter_name!r} has a {type(cfg).__name__}, not a FineSteerConfig",
                              "FineSteer adapters cannot be mixed with other PEFT methods in one model")
        complete_config(cfg, model)
        check_config_fields(cfg.to_dict(), f"FineSteer config of adapter {adapter_name!r}")
        source = getattr(cfg, "_source", None) or (source[0] if source is not None else None)
        check_compatible(model, cfg, where=f"adapter {source}" if source else f"FineSteer adapter {adapter_name!r}")
        if any(adapter_name in layer.fsteer or adapter_name in layer.taps for layer in steering_layers(model)):
            raise FSteerError(f"an adapter named {adapter_name!r} is already loaded", "pick another adapter name")
        add_adapter(model, cfg, name=adapter_name)
        names = {name for name, module in model.named_modules()
                 if isinstance(module, SteeringLayer) and module.layer_index in (cfg.layer, cfg.gate_layer)}
        self.targeted_module_names.extend(sorted(names - set(self.targeted_module_names)))
        self.set_adapter(self.active_adapters, inference_mode=cfg.inference_mode)
        self._mark_only_adapters_as_trainable(model)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key,
                            parameter_name=None) -> None:
        """Unused: :meth:`inject_adapter` installs the wrappers (kept for BaseTuner's abstract API)."""
        raise FSteerError("FineSteer adapters are installed by FineSteerModel.inject_adapter",
                          "use get_peft_model / PeftModel.from_pretrained")

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Swap a decoder layer and its wrapper; a decoder layer has no ``weight`` to copy (LoRA's version
        assumes one), and the adapter tensors already sit on the base layer's device."""
        setattr(parent, child_name, new_module)

    # -- merging is impossible; unloading is not ---------------------------------------------
    def _check_merge_allowed(self) -> None:
        raise FSteerError(_MERGE_PROBLEM, _MERGE_FIX)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise FSteerError(_MERGE_PROBLEM, _MERGE_FIX)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            raise FSteerError(_MERGE_PROBLEM, _MERGE_FIX)
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        remove_steering(model)  # drops the pre-forward hook and the session-wrapped generate
        return model

    # -- state-dict keys: "...fsteer.<adapter>.gate.mu" <-> "...fsteer.gate.mu" -------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """The adapter name sits right after the ``fsteer`` segment, not second to last as PEFT assumes."""
        return key.replace(f".{PREFIX}.{adapter_name}.", f".{PREFIX}.", 1)

    # -- generation ---------------------------------------------------------------------------
    def generate(self, *args: Any, **kwargs: Any):
        """g·v from the prompt, held for every decode step (with and without the KV cache)."""
        with generation_session(self.model):
            return self.model.generate(*args, **kwargs)


# -- registration ------------------------------------------------------------------------------

def is_registered() -> bool:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return (PEFT_TYPE_TO_CONFIG_MAPPING.get(FINESTEER) is FineSteerConfig
            and PEFT_TYPE_TO_TUNER_MAPPING.get(FINESTEER) is FineSteerModel)


def register() -> None:
    """Register FINESTEER with PEFT (idempotent). ``PeftType`` was extended in :mod:`.config`."""
    if is_registered():
        return
    from peft.mapping import (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
                              PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING)
    from peft.utils import register_peft_method

    for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
                    PEFT_TYPE_TO_PREFIX_MAPPING):
        mapping.pop(FINESTEER, None)  # a stale entry (e.g. after a module reload) would make it raise
    register_peft_method(name=METHOD_NAME, config_cls=FineSteerConfig, model_cls=FineSteerModel, prefix=PREFIX)


def ensure_registered() -> None:
    """Our loaders call this: an unregistered type gets one clear line naming the fix."""
    try:
        register()
    except Exception as exc:  # peft refused (renamed internals, another package took the name)
        raise FSteerError(f"PEFT does not know the {PEFT_TYPE_NAME} adapter type ({exc})", IMPORT_HINT) from exc
    if not is_registered():
        raise FSteerError(f"PEFT does not know the {PEFT_TYPE_NAME} adapter type", IMPORT_HINT)


# -- validated loading ------------------------------------------------------------------------

def _hub_folder(repo_id: str, subfolder: str | None, kwargs: dict) -> Path:
    """Download config + safetensors weights of a hub adapter and return their snapshot folder.

    Only ``adapter_model.safetensors`` is fetched: if it is missing we stop here, before PEFT's
    loader could fall back to a pickle-based ``adapter_model.bin``.
    """
    from huggingface_hub import hf_hub_download

    from .adapter import CONFIG_NAME, WEIGHTS_NAME

    keep = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "repo_type") if k in kwargs}
    try:
        hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, **keep)
        weights = hf_hub_download(repo_id, WEIGHTS_NAME, subfolder=subfolder, **keep)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FSteerError(f"could not fetch {WEIGHTS_NAME} of adapter {repo_id!r}: {first}",
                          "FineSteer adapters load from safetensors only; check the repo id and network") from exc
    return Path(weights).parent


def _transformers_adapter_source() -> tuple[str, dict] | None:
    """(adapter folder or hub id, download kwargs) when called from transformers' ``load_adapter``.

    That path builds the config with the base ``PeftConfig.from_pretrained`` (so our validating
    override never runs) and would fall back to a pickle-based ``adapter_model.bin``. The tuner is
    the only FineSteer code it reaches before loading weights, so the tuner looks up which folder is
    being loaded and validates it first. Best effort: if transformers renames things, loading still
    works, only without this early check.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if (frame.f_code.co_name == "load_adapter"
                    and str(frame.f_globals.get("__name__", "")).startswith("transformers.")):
                source = frame.f_locals.get("peft_model_id")
                if source is None or frame.f_locals.get("adapter_state_dict") is not None:
                    return None
                kwargs = getattr(frame.f_locals.get("load_config"), "download_kwargs", None) or {}
                return str(source), dict(kwargs)
            frame = frame.f_back
        return None
    finally:
        del frame


def validated_folder(model_id: str | os.PathLike, subfolder: str | None = None, **kwargs: Any) -> tuple[Path, FineSteerConfig]:
    """Resolve a local folder or hub id and validate its config and weights (no pickle, shapes, NaN)."""
    from .adapter import read_config, read_weights

    local = Path(model_id) / subfolder if subfolder else Path(model_id)
    folder = local if local.is_dir() else _hub_folder(str(model_id), subfolder, kwargs)
    cfg = read_config(folder)
    read_weights(folder, cfg)
    return folder, cfg


def load_peft(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default", **kwargs: Any):
    """``PeftModel.from_pretrained`` with our checks first (registration, compatibility) and FSteerErrors."""
    from peft import PeftModel

    ensure_registered()
    _, cfg = validated_folder(folder)
    check_compatible(model, cfg, where=f"adapter {folder}")
    return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, **kwargs)


register()
