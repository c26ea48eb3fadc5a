"""Seeded train/test splits of the shared data sets, written to an output folder (never the repo).

AdvBench and StrongREJECT are split 60/40 (train/test); Alpaca gives a training slice (--general)
and a disjoint test slice; XSTest's 250 "safe" and 200 "unsafe" prompts are test-only.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(path: Path, prompts: list[str]) -> str:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def prepare(out: Path, seed: int = 0, shared: Path = SHARED, n_alpaca_train: int = 400,
            n_alpaca_test: int = 200) -> dict[str, str]:
    if not shared.is_dir():
        raise SystemExit(f"shared data not found at {shared}: these benchmarks need ../shared/data")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    adv = [r["goal"] for r in csv.DictReader((shared / "advbench/harmful_behaviors.csv").open(encoding="utf-8"))]
    targets = {r["goal"]: r["target"] for r in csv.DictReader((shared / "advbench/harmful_behaviors.csv").open(encoding="utf-8"))}
    sr = [r["forbidden_prompt"] for r in csv.DictReader((shared / "strongreject/strongreject_dataset.csv").open(encoding="utf-8"))]
    alpaca = [r["instruction"] for r in json.loads((shared / "alpaca/alpaca.json").read_text())]
    xs_rows = list(csv.DictReader((shared / "xstest/xstest_prompts.csv").open(encoding="utf-8")))
    xs = [r["prompt"] for r in xs_rows if r["label"] == "safe"]
    xs_unsafe = [r["prompt"] for r in xs_rows if r["label"] == "unsafe"]
    rng.shuffle(adv), rng.shuffle(sr), rng.shuffle(alpaca)
    cut_a, cut_s = int(0.6 * len(adv)), int(0.6 * len(sr))
    adv_train = out / "advbench_train.csv"
    with adv_train.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["goal", "target"])
        for g in adv[:cut_a]:
            w.writerow([g, targets[g]])
    return {
        "advbench_train": str(adv_train),
        "advbench_test": _write(out / "advbench_test.jsonl", adv[cut_a:]),
        "strongreject_train": _write(out / "strongreject_train.jsonl", sr[:cut_s]),
        "strongreject_test": _write(out / "strongreject_test.jsonl", sr[cut_s:]),
        "alpaca_train": _write(out / "alpaca_train.jsonl", alpaca[:n_alpaca_train]),
        "alpaca_test": _write(out / "alpaca_test.jsonl", alpaca[n_alpaca_train:n_alpaca_train + n_alpaca_test]),
        "xstest_safe": _write(out / "xstest_safe.jsonl", xs),
        # harmful requests phrased as short questions, unlike AdvBench: a test of the gate's reach
        "xstest_unsafe": _write(out / "xstest_unsafe.jsonl", xs_unsafe),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/out/splits"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(prepare(a.out, a.seed), indent=2))
