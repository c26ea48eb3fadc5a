"""Shared bits of the benchmark scripts: machine description and JSON + Markdown output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": _dt.date.today().isoformat()}


def write(out: Path, name: str, results: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), **results}
    (out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown + f"\n\nMachine: {results['machine']}\n")
    print(markdown)
