"""The one steering module: eager inference, the PEFT tuner and the ONNX export all use it.

Convention (DESIGN §2): the query state ĥ_q is read at the *input* of decoder layer L at each
row's last prompt token; the vector λ·g·v is added to the *output* of layer L at every position.
The gate may read the input of an earlier layer G ≤ L; a :class:`SteeringLayer` at G then only
"taps" that state. Both are known before layer L's output is changed: one forward pass.
The gate reads either the last prompt token's state (``gate_pool="last"``) or the mean over the
prompt's tokens (``"mean"``, :func:`prompt_pool_weights`): the mean carries *what* is asked and
depends less on *how* it is phrased (measured, bench/RESULTS.md).

g·v is computed once per sequence at prefill, per row, and held in :class:`SteeringContext`
(the single owner of mutable state — torch.export copies dicts held by modules) for every
decode step.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import GATE_POOLS, FineSteerConfig
from .errors import FSteerError
from .models import check_layer, decoder_layers, hidden_size, model_type, num_layers
from .mose import MixtureOfSteeringExperts
from .scs import SubspaceGate

ADAPTER_ATTR = "fsteer"  # state-dict key segment: ...layers.L.fsteer.<adapter>.gate.mu


class FineSteerHead(nn.Module):
    """SCS gate + MoSE for one adapter: (h_gate, h_q) → (g, v), in float32."""

    def __init__(self, cfg: FineSteerConfig) -> None:
        super().__init__()
        self.gate = SubspaceGate(cfg.hidden_size, cfg.gate_rank, cfg.calib_size, kind=cfg.gate_kind)
        self.mose = MixtureOfSteeringExperts(cfg.hidden_size, cfg.experts, cfg.residual_rank,
                                             key_dim=cfg.key_dim, mlp_hidden=cfg.mlp_hidden)
        self.strength = float(cfg.strength)
        self.gate_layer = int(cfg.gate_layer)
        self.gate_pool = cfg.gate_pool

    def forward(self, h_gate: torch.Tensor, h_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(h_gate), self.mose(h_q)


class SteeringContext:
    """Mutable per-model state shared by all steering layers of one model."""

    def __init__(self) -> None:
        self.prefill = True
        self.last_index: torch.Tensor | None = None  # (B,) last prompt token per row; None: -1
        self.forced_index: torch.Tensor | None = None  # scoring q+a in one pass: where q ends
        self.pool_weights: torch.Tensor | None = None  # (B, T) prompt positions the mean gate input averages
        self.gate_inputs: dict[str, dict[str, torch.Tensor]] = {}  # adapter → {"last": …, "mean": …}
        self.states: dict[str, torch.Tensor] = {}  # adapter → g·v, (B, d) float32
        self.gates: dict[str, torch.Tensor] = {}  # adapter → g, (B,)
        self.session = False  # inside generate(): keep states after the first forward
        self.disabled = False
        self.strengths: dict[str, float] = {}  # per-adapter override of the head's λ
        # ONNX export: explicit state in/out instead of the Python-side dict.
        self.export = False
        self.export_prefill: torch.Tensor | None = None  # bool scalar tensor
        self.export_state_in: torch.Tensor | None = None
        self.export_state_out: torch.Tensor | None = None
        self.export_strength: torch.Tensor | None = None
        self.export_gate_out: torch.Tensor | None = None

    def reset(self) -> None:
        self.states.clear()
        self.gates.clear()
        self.gate_inputs.clear()


def _last_token(hidden: torch.Tensor, last_index: torch.Tensor | None) -> torch.Tensor:
    if last_index is None:
        return hidden[:, -1, :]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index.to(hidden.device)]


def prompt_pool_weights(attention_mask: torch.Tensor | None, last_index: torch.Tensor | None,
                        shape: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(B, T) 0/1 weights of the positions the mean gate input averages: each row's attended tokens up
    to its last prompt token, without its first one. Every prompt's first token holds the same outsized
    "attention sink" state; averaged in, it would only add an offset that depends on the length.
    A row with a single token keeps it. Written with plain tensor ops so the ONNX graph runs it too."""
    b, t = shape
    pos = torch.arange(t, device=device)[None, :]
    att = torch.ones(b, t, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.to(device) != 0
    if last_index is not None:
        att = att & (pos <= last_index.to(device)[:, None])
    att = att.to(torch.float32)  # float from here: onnxruntime has no Where on bool tensors
    first = att.argmax(1, keepdim=True)
    keep = att * (pos != first).to(torch.float32)
    return torch.where(keep.sum(1, keepdim=True) > 0, keep, att)


def mean_pool(hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Weighted mean over positions, in float32: (B, T, d) × (B, T) → (B, d)."""
    h = hidden.float()
    if weights is None or weights.shape != h.shape[:2]:
        weights = prompt_pool_weights(None, None, (h.shape[0], h.shape[1]), h.device)
    w = weights.to(h.device)
    return (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


def gate_features(hidden: torch.Tensor, last: torch.Tensor, weights: torch.Tensor | None,
                  pools: Sequence[str] = GATE_POOLS) -> dict[str, torch.Tensor]:
    """The gate inputs a layer offers (``pools`` of them); the head picks one by its ``gate_pool``."""
    return {p: last if p == "last" else mean_pool(hidden, weights) for p in pools}


class SteeringLayer(nn.Module, BaseTunerLayer):
    """Wraps one decoder layer: taps gate inputs and adds λ·g·v of its own heads."""

    adapter_layer_names = (ADAPTER_ATTR,)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, layer_index: int, ctx: SteeringContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.fsteer = nn.ModuleDict()
        self.taps: list[str] = []  # adapters whose gate reads this layer's input (G < L)
        self._ctx = [ctx]  # a list so nn.Module does not try to register it
        self._active_adapter: str | list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    # -- PEFT BaseTunerLayer protocol -------------------------------------------------
    @property
    def ctx(self) -> SteeringContext:
        return self._ctx[0]

    def update_layer(self, adapter_name: str, cfg: FineSteerConfig) -> None:
        head = FineSteerHead(cfg)
        if not any(p.is_meta for p in head.parameters()):  # PEFT low_cpu_mem_usage: loading assigns them
            head = head.to(self._device())
        self.fsteer[adapter_name] = head
        self.set_adapter(sorted(set(self.active_adapters) | {adapter_name}))

    def _device(self) -> torch.device:
        for p in self.base_layer.parameters():
            return p.device
        return torch.device("cpu")

    def merge(self, *args, **kwargs) -> None:
        raise FSteerError("a FineSteer adapter cannot be merged into the weights: its gate and vector "
                          "depend on each prompt, so no fixed weight change reproduces it",
                          "keep the adapter loaded, or call unload() to remove the steering")

    def unmerge(self) -> None:
        return None

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        self._active_adapter = [a for a in adapter_names if a in self.fsteer or a in self.taps]
        for name, head in self.fsteer.items():
            head.requires_grad_(name in self._active_adapter and not inference_mode)

    def delete_adapter(self, adapter_name: str, new_active_adapters=None) -> None:
        if adapter_name in self.fsteer:
            del self.fsteer[adapter_name]
        if adapter_name in self.taps:
            self.taps.remove(adapter_name)
        self._active_adapter = [a for a in self.active_adapters if a != adapter_name]

    # -- the steering computation -----------------------------------------------------
    def _active(self, names) -> list[str]:
        """Active adapters in load order, so composed vectors are summed in the same order on every path."""
        if self.disable_adapters or self.ctx.disabled:
            return []
        active = set(self.active_adapters)
        return [a for a in names if a in active]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        ctx = self.ctx
        heads = self._active(self.fsteer)
        taps = self._active(self.taps)
        fresh = ctx.export or ctx.prefill
        if fresh and (taps or heads):
            last = _last_token(hidden_states, ctx.last_index)
            for name in taps:
                ctx.gate_inputs[name] = gate_features(hidden_states, last, ctx.pool_weights)
        out = self.base_layer(hidden_states, *args, **kwargs)
        if not heads:
            return out
        tensor = out[0] if isinstance(out, tuple) else out
        for name in heads:
            head = self.fsteer[name]
            if ctx.export:
                tensor = self._export_step(name, head, tensor, self._gate_input(name, head, hidden_states, last), last)
                continue
            state = ctx.states.get(name)
            if state is None or state.shape[0] != tensor.shape[0]:
                q = last if fresh else _last_token(hidden_states, None)
                h_gate = self._gate_input(name, head, hidden_states, q, prompt_pass=fresh)
                with torch.no_grad() if not torch.is_grad_enabled() else contextlib.nullcontext():
                    g, v = head(h_gate, q)
                state = g[:, None] * v
                ctx.states[name], ctx.gates[name] = state, g
            strength = ctx.strengths.get(name, head.strength)
            if strength != 0.0:
                tensor = tensor + (strength * state).to(tensor.dtype)[:, None, :]
        return (tensor,) + tuple(out[1:]) if isinstance(out, tuple) else tensor

    def _gate_input(self, name: str, head: nn.Module, hidden: torch.Tensor, last: torch.Tensor,
                    prompt_pass: bool = True) -> torch.Tensor:
        """The state the head's gate reads: tapped at G < L, else this layer's input; last or mean.
        Outside a prompt pass there is no prompt mask: the mean is over the current tokens."""
        pool = getattr(head, "gate_pool", "last")
        tapped = self.ctx.gate_inputs.get(name) if head.gate_layer != self.layer_index else None
        if tapped is not None:
            return tapped[pool]
        if pool == "last":
            return last
        return mean_pool(hidden, self.ctx.pool_weights if prompt_pass else None)

    def _export_step(self, name: str, head: FineSteerHead, tensor: torch.Tensor, h_gate: torch.Tensor,
                     last: torch.Tensor) -> torch.Tensor:
        """Graph form: state = prefill ? g·v(prompt) : state_in; output += λ·state."""
        ctx = self.ctx
        g, v = head(h_gate, last)
        state = torch.where(ctx.export_prefill, g[:, None] * v, ctx.export_state_in)
        ctx.export_state_out = state
        ctx.export_gate_out = torch.where(ctx.export_prefill, g, torch.full_like(g, -1.0))
        return tensor + (ctx.export_strength * state).to(tensor.dtype)[:, None, :]

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}, adapters={list(self.fsteer)}, taps={self.taps}"


# -- attaching to a transformers model ---------------------------------------------------

def _backbone(model: nn.Module) -> nn.Module:
    """The module that owns the decoder-layer list (its forward sees cache and attention mask)."""
    layers = decoder_layers(model)
    for module in model.modules():
        for child in module.children():
            if child is layers:
                return module
    raise FSteerError("could not find the module that owns the decoder layers", "use a supported model")


def _cache_length(args: tuple, kwargs: dict) -> int:
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is not None:
            break
    else:
        cache = next((a for a in args if hasattr(a, "get_seq_length")), None)
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple of (k, v)
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def last_prompt_index(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-row index of the last attended token of a 2-D mask (works for left or right padding)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    length = attention_mask.shape[1]
    return (length - 1 - attention_mask.flip(1).to(torch.long).argmax(1)).to(torch.long)


def _prompt_weights(args: tuple, kwargs: dict, last_index: torch.Tensor | None) -> torch.Tensor | None:
    """Mean-pool weights for this prompt pass, from the 2-D attention mask when there is one."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if ref is None:
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and (mask.dim() != 2 or mask.shape[1] != ref.shape[1]):
        mask = None  # a 4-D or cache-length mask: fall back to every position up to the last prompt token
    return prompt_pool_weights(mask, last_index, (ref.shape[0], ref.shape[1]), ref.device)


def _make_pre_hook(ctx: SteeringContext):
    def hook(module, args, kwargs):
        if ctx.export:
            return None
        fresh = _cache_length(args, kwargs) == 0 and not (ctx.session and ctx.states)
        ctx.prefill = fresh
        if fresh:
            ctx.reset()
            mask = kwargs.get("attention_mask")
            ctx.last_index = ctx.forced_index if ctx.forced_index is not None else last_prompt_index(mask)
            ctx.pool_weights = _prompt_weights(args, kwargs, ctx.last_index)
        return None
    return hook


def _generating_model(model: nn.Module) -> nn.Module | None:
    """The transformers model whose ``generate`` runs the decode loop (the *ForCausalLM)."""
    from transformers import GenerationMixin

    for module in model.modules():
        if isinstance(module, GenerationMixin) and hasattr(module, "config"):
            return module
    return None


def _session_generate(self: nn.Module, *args, **kwargs):
    """``generate`` inside a generation session: g·v comes from the prompt and is held for every step.

    Installed on the model instance so that callers who never heard of sessions (``PeftModel.generate``,
    transformers' own ``load_adapter`` path, plain ``model.generate``) get the same tokens with and
    without the KV cache.
    """
    with generation_session(self):
        return type(self).generate(self, *args, **kwargs)


def steering_context(model: nn.Module, create: bool = True) -> SteeringContext | None:
    """The model's context (created with its pre-forward hook on first use)."""
    backbone = _backbone(model)
    ctx = getattr(backbone, "_fsteer_ctx", None)
    if ctx is None and create:
        ctx = SteeringContext()
        backbone._fsteer_ctx = ctx
        backbone._fsteer_hook = backbone.register_forward_pre_hook(_make_pre_hook(ctx), with_kwargs=True)
        top = _generating_model(model)
        if top is not None and "generate" not in vars(top):
            top.generate = types.MethodType(_session_generate, top)
    return ctx


def wrap_layer(model: nn.Module, index: int) -> SteeringLayer:
    """Replace decoder layer ``index`` by a SteeringLayer (idempotent)."""
    layers = decoder_layers(model)
    current = layers[index]
    if isinstance(current, SteeringLayer):
        return current
    wrapper = SteeringLayer(current, index, steering_context(model))
    layers[index] = wrapper
    return wrapper


def check_compatible(model: nn.Module, cfg: FineSteerConfig, where: str = "adapter") -> None:
    """Refuse an adapter made for another model, naming both values."""
    checks = [("hidden size", cfg.hidden_size, hidden_size(model)),
              ("number of layers", cfg.base_num_layers, num_layers(model)),
              ("model_type", cfg.base_model_type, model_type(model))]
    for what, theirs, ours in checks:
        if theirs not in (None, "", 0) and theirs != ours:
            raise FSteerError(f"{where} was trained for a model with {what} {theirs!r}, but this model has {ours!r}",
                              f"load it onto its base model ({cfg.base_model_name_or_path or 'see adapter_config.json'})")
    check_layer(model, cfg.layer, "adapter layer")
    check_layer(model, cfg.gate_layer, "adapter gate_layer")
    if cfg.gate_layer > cfg.layer:
        raise FSteerError(f"gate layer {cfg.gate_layer} is after steering layer {cfg.layer}",
                          "the gate must read a layer G ≤ L")


def add_adapter(model: nn.Module, cfg: FineSteerConfig, name: str = "default",
                state: dict[str, torch.Tensor] | None = None) -> FineSteerHead:
    """Install an adapter head at layer L (and a tap at G), optionally loading its tensors."""
    check_compatible(model, cfg)
    wrapper = wrap_layer(model, cfg.layer)
    if name in wrapper.fsteer:
        raise FSteerError(f"an adapter named {name!r} is already loaded", "pick another adapter name")
    wrapper.update_layer(name, cfg)
    head = wrapper.fsteer[name]
    if cfg.gate_layer != cfg.layer:
        tap = wrap_layer(model, cfg.gate_layer)
        tap.taps.append(name)
        tap.set_adapter(sorted(set(tap.active_adapters) | {name}))
    if state is not None:
        head.load_state_dict(state, strict=True)
    head.eval()
    return head


def steering_layers(model: nn.Module) -> list[SteeringLayer]:
    return [m for m in decoder_layers(model) if isinstance(m, SteeringLayer)]


def heads(model: nn.Module) -> dict[str, FineSteerHead]:
    return {name: head for layer in steering_layers(model) for name, head in layer.fsteer.items()}


def remove_steering(model: nn.Module) -> nn.Module:
    """Put the original decoder layers back and drop the hook: the plain base model again."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if isinstance(layer, SteeringLayer):
            layers[i] = layer.base_layer
    backbone = _backbone(model)
    if getattr(backbone, "_fsteer_hook", None) is not None:
        backbone._fsteer_hook.remove()
        del backbone._fsteer_hook
        del backbone._fsteer_ctx
    top = _generating_model(model)
    method = vars(top).get("generate") if top is not None else None
    if getattr(method, "__func__", None) is _session_generate:
        del top.generate
    return model


@contextlib.contextmanager
def generation_session(model: nn.Module) -> Iterator[SteeringContext]:
    """Compute g·v at the first forward and hold it for every later step (with or without cache).

    Re-entrant: an inner session (the ``generate`` wrapper inside :func:`fsteer_export.generate.generate`)
    joins the outer one instead of ending it early.
    """
    ctx = steering_context(model)
    if ctx.session:
        yield ctx
        return
    ctx.reset()
    ctx.session = True
    try:
        yield ctx
    finally:
        ctx.session = False


@contextlib.contextmanager
def prompt_end(model: nn.Module, index: torch.Tensor) -> Iterator[None]:
    """Score prompt + answer in one pass: the gate and vector read each row's prompt end ``index``."""
    ctx = steering_context(model)
    ctx.forced_index = index
    try:
        yield
    finally:
        ctx.forced_index = None


@contextlib.contextmanager
def steering_disabled(model: nn.Module) -> Iterator[None]:
    ctx = steering_context(model)
    before = ctx.disabled
    ctx.disabled = True
    try:
        yield
    finally:
        ctx.disabled = before


@contextlib.contextmanager
def strength_override(model: nn.Module, strengths: dict[str, float] | float) -> Iterator[None]:
    """Temporarily set λ (one value for all adapters, or per adapter)."""
    ctx = steering_context(model)
    before = dict(ctx.strengths)
    if isinstance(strengths, (int, float)):
        strengths = {name: float(strengths) for name in heads(model)}
    ctx.strengths.update(strengths)
    try:
        yield
    finally:
        ctx.strengths = before
