"""The adapter's model card (README.md with Hub YAML metadata), built with huggingface_hub."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard, ModelCardData

from .config import FineSteerConfig

_TEMPLATE = """---
{{ card_data }}
---

# FineSteer adapter ({{ task }}) for `{{ base }}`

A [FineSteer](https://github.com/) activation-steering adapter made with `fsteer_export`: a gate
(SCS) decides per prompt *whether* to steer, a mixture of steering experts (MoSE) decides *how*.
Unlike LoRA it changes no weights: it adds `λ·g(prompt)·v(prompt)` to the output of decoder
layer {{ layer }}, and only on prompts the gate recognises.

| | |
|---|---|
| steers | {{ task }} |
| steering layer L | {{ layer }} (vector added to its output) |
| gate layer G | {{ gate_layer }} (gate reads its input at the last prompt token) |
| gate | {{ gate_kind }}, subspace rank {{ gate_rank }}, {{ calib }} calibration scores |
| experts | {{ experts }} prototypes + residual rank {{ residual_rank }}, router key dim {{ key_dim }} |
| strength λ | {{ strength }} |
| base model | `{{ base }}` ({{ model_type }}, {{ num_layers }} layers, d = {{ hidden }}) |

## Loading

`fsteer_export` must be imported first: it registers the `FINESTEER` PEFT type
(without it PEFT raises an error about an unknown `peft_type`).

```python
import fsteer_export  # registers the FINESTEER PEFT method
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{{ base }}")
model = PeftModel.from_pretrained(base, "path/or/hub-id/of/this/adapter")
```

or from the command line: `fsteer generate --model {{ base }} --adapter THIS_FOLDER --prompt "..."`.

The adapter cannot be merged into the weights (`merge_and_unload` raises): the gate and the
vector depend on each prompt. `unload()` gives the base model back.

## Training and evaluation

{{ training }}
"""


def model_card(cfg: FineSteerConfig, report: dict | None = None) -> str:
    base = cfg.base_model_name_or_path or "unknown"
    data = ModelCardData(library_name="peft", base_model=base if "/" in base else None,
                         tags=["fsteer", "activation-steering", "finesteer", "peft", cfg.task],
                         pipeline_tag="text-generation")
    if report:
        keep = {k: report[k] for k in ("counts", "gate_validation", "strength_trials", "timings_s") if k in report}
        training = "```json\n" + json.dumps(keep, indent=2, default=str) + "\n```"
        if "evaluation" in report:
            training += "\n\nEvaluation:\n\n```json\n" + json.dumps(report["evaluation"], indent=2) + "\n```"
    else:
        training = "No training report was recorded."
    card = ModelCard.from_template(
        data, template_str=_TEMPLATE, task=cfg.task, base=base, layer=cfg.layer, gate_layer=cfg.gate_layer,
        gate_kind=cfg.gate_kind, gate_rank=cfg.gate_rank, calib=cfg.calib_size, experts=cfg.experts,
        residual_rank=cfg.residual_rank, key_dim=cfg.key_dim, strength=cfg.strength, model_type=cfg.base_model_type,
        num_layers=cfg.base_num_layers, hidden=cfg.hidden_size, training=training)
    return str(card)
