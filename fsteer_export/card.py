"""The adapter's model card (README.md with Hub YAML metadata), built with huggingface_hub."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .config import FineSteerConfig

_TEMPLATE = """---
{{ card_data }}
---

# FineSteer adapter ({{ task }}) for `{{ base }}`

A FineSteer activation-steering adapter made with `fsteer_export`: a gate
(SCS) decides per prompt *whether* to steer, a mixture of steering experts (MoSE) decides *how*.
Unlike LoRA it changes no weights: it adds `λ·g(prompt)·v(prompt)` to the output of decoder
layer {{ layer }}, and only on prompts the gate recognises.

| | |
|---|---|
| steers | {{ task }} |
| steering layer L | {{ layer }} (vector added to its output) |
| gate layer G | {{ gate_layer }} (gate reads its input: {{ gate_pool }}) |
| gate | {{ gate_kind }}, subspace rank {{ gate_rank }}, {{ calib }} calibration scores |
| experts | {{ experts }} prototypes + residual rank {{ residual_rank }}, router key dim {{ key_dim }} |
| strength λ | {{ strength }} |
| base model | `{{ base }}` ({{ model_type }}, {{ num_layers }} layers, d = {{ hidden }}) |

## Loading

The `fsteer_export` package must be installed and imported first: it registers the `FINESTEER`
PEFT type. Without it PEFT does not know the type and fails with `KeyError: 'FINESTEER'`.

```python
import fsteer_export  # registers the FINESTEER PEFT method
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{{ load_id }}")
tok = AutoTokenizer.from_pretrained("{{ load_id }}")
model = PeftModel.from_pretrained(base, "path/or/hub-id/of/this/adapter")

msgs = [{"role": "user", "content": "..."}]
inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**inputs, max_new_tokens=64)  # g and v come from the prompt, held for every new token
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
{% if load_note %}
{{ load_note }}
{% endif %}
transformers' own integration works too: `base.load_adapter("path/or/hub-id")`. Several FineSteer
adapters (e.g. safety + truthfulness) compose: load the second with
`model.load_adapter(other, adapter_name="b")`, then `model.base_model.set_adapter(["default", "b"])`;
each keeps its own gate and vector and they add up where both fire.

From the command line: `fsteer generate --model {{ base }} --adapter THIS_FOLDER --prompt "..."`.

The adapter cannot be merged into the weights (`merge_and_unload` raises): the gate and the
vector depend on each prompt. `unload()` gives the base model back.

## Training and evaluation

{{ training }}
"""


# Bundled model aliases → the Hub model they were made from (for `base_model` metadata and snippets).
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(base: str) -> str | None:
    """The Hub id of the base model, or None for a local path (the Hub rejects those as ``base_model``)."""
    if base in HUB_IDS:
        return HUB_IDS[base]
    path = Path(base).expanduser()
    if base.count("/") != 1 or base.startswith((".", "/", "~")) or path.exists() or path.suffix == ".gguf":
        return None
    return base


def model_card(cfg: FineSteerConfig, report: dict | None = None) -> str:
    base = cfg.base_model_name_or_path or "unknown"
    repo = hub_id(base)
    load_note = ""
    if base in HUB_IDS:
        load_note = (f"The adapter was trained on `{base}`, the Q4_1 GGUF of `{repo}` as converted by "
                     f"`fsteer_export.models.load_model({base!r})`; load that for exact results.")
    elif repo is None:
        load_note = f"The base model was a local checkpoint (`{base}`): load the same weights."
    data = ModelCardData(library_name="peft", base_model=repo,
                         tags=["fsteer", "activation-steering", "finesteer", "peft", cfg.task],
                         pipeline_tag="text-generation")
    if report:
        keep = {k: report[k] for k in ("counts", "gate_validation", "strength_trials") if k in report}
        training = "```json\n" + json.dumps(keep, indent=2, default=str) + "\n```"
        if "evaluation" in report:
            training += "\n\nEvaluation:\n\n```json\n" + json.dumps(report["evaluation"], indent=2) + "\n```"
    else:
        training = "No training report was recorded."
    card = ModelCard.from_template(
        data, template_str=_TEMPLATE, task=cfg.task, base=base, layer=cfg.layer, gate_layer=cfg.gate_layer,
        gate_pool="the last prompt token" if cfg.gate_pool == "last" else "the mean over the prompt's tokens",
        gate_kind=cfg.gate_kind, gate_rank=cfg.gate_rank, calib=cfg.calib_size, experts=cfg.experts,
        residual_rank=cfg.residual_rank, key_dim=cfg.key_dim, strength=cfg.strength, model_type=cfg.base_model_type,
        num_layers=cfg.base_num_layers, hidden=cfg.hidden_size, training=training, load_id=repo or base,
        load_note=load_note)
    return str(card)
