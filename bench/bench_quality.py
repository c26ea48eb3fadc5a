"""TruthfulQA (MC1/MC2, 2-fold cross-validation) and MMLU utility on SmolLM2-135M-Instruct.

    .venv/bin/python bench/bench_quality.py --adapter SAFETY_ADAPTER --out bench/out/quality [--tqa-limit 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402
from prepare_splits import SHARED  # noqa: E402

from fsteer_export.adapter import load_adapter  # noqa: E402
from fsteer_export.eval.report import write_report  # noqa: E402
from fsteer_export.eval.truthfulqa import TruthfulOptions, run_truthfulqa  # noqa: E402
from fsteer_export.eval.utility import run_utility  # noqa: E402
from fsteer_export.models import load_model  # noqa: E402
from fsteer_export.steering import remove_steering  # noqa: E402
from fsteer_export.train import TrainOptions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/out/quality"))
    ap.add_argument("--adapter", type=Path, help="a safety adapter for the MMLU utility check")
    ap.add_argument("--tqa-limit", type=int, default=200)
    ap.add_argument("--mmlu-per-subject", type=int, default=2)
    ap.add_argument("--skip-tqa", action="store_true")
    ap.add_argument("--layer", type=int, help="steering layer for TruthfulQA (default: the training default)")
    ap.add_argument("--experts", type=int, help="MoSE experts K for TruthfulQA (default: Calinski–Harabasz)")
    ap.add_argument("--strengths", default="1,2,4", help="λ grid searched on each fold's validation questions")
    ap.add_argument("--methods", default="none,finesteer,caa,mose-only,scs-only")
    ap.add_argument("--incorrect-per-question", type=int, default=1,
                    help="TruthfulQA training pairs per question: best answer vs k incorrect answers (0: all)")
    a = ap.parse_args()
    lm = load_model("smollm2-135m-instruct")
    if a.adapter:
        load_adapter(lm.model, a.adapter)
        res = run_utility(lm, SHARED / "mmlu", per_subject=a.mmlu_per_subject)
        res["machine"] = machine()
        write_report(res, a.out / "utility", overwrite=True)
        print((a.out / "utility" / "report.md").read_text())
        remove_steering(lm.model)
    if not a.skip_tqa:
        opts = TruthfulOptions(limit=a.tqa_limit, strengths=tuple(float(x) for x in a.strengths.split(",")),
                               n_strength_val=16, methods=tuple(a.methods.split(",")),
                               incorrect_per_question=a.incorrect_per_question,
                               train=TrainOptions(task="truthfulqa", layer=a.layer, experts=a.experts))
        res = run_truthfulqa(lm, SHARED / "truthfulqa" / "mc_task.json", opts)
        res["machine"] = machine()
        write_report(res, a.out / "truthfulqa", overwrite=True)
        print((a.out / "truthfulqa" / "report.md").read_text())


if __name__ == "__main__":
    main()
