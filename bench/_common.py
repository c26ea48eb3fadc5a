"""Shared bits of the benchmark scripts: machine description and JSON + Markdown output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": _dt.date.today().isoformat()}


def timings(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn``."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def write(out: Path, name: str, results: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), **results}
    (out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown + f"\n\nMachine: {results['machine']}\n")
    print(markdown)
