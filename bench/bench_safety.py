"""The headline safety table on SmolLM2-135M-Instruct from ../shared/data: FineSteer vs none,
CAA, RV, CAST-style, MoSE-only and SCS-only, plus the trade-off sweep and plots.

    .venv/bin/python bench/bench_safety.py --out bench/out/safety [--n 100] [--n-benign 250]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402
from prepare_splits import prepare  # noqa: E402

from fsteer_export.eval.report import write_report  # noqa: E402
from fsteer_export.eval.safety import SafetyOptions, run_safety  # noqa: E402
from fsteer_export.models import load_model  # noqa: E402
from fsteer_export.train import TrainOptions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/out/safety"))
    ap.add_argument("--n", type=int, default=100, help="harmful test prompts")
    ap.add_argument("--n-benign", type=int, default=250,
                    help="prompts per benign set (default 250: all 250 XSTest-safe and the 200-prompt Alpaca "
                         "test slice; one prompt is 0.4–0.5 points, where the target is 2 points)")
    ap.add_argument("--methods", default="none,finesteer,caa,rv,cast,mose-only,scs-only")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--on-policy", action="store_true", help="train FineSteer on the model's own answers")
    ap.add_argument("--layer", type=int, default=None, help="steering layer L (default: the trainer's)")
    ap.add_argument("--gate-layer", type=int, default=None, help="gate layer G (default: chosen on validation)")
    ap.add_argument("--gate-pool", choices=("last", "mean"), default=None,
                    help="what the gate reads (default: chosen on validation)")
    ap.add_argument("--harmful", nargs="*", default=None,
                    help="harmful test sets (default: held-out AdvBench); names of prepared splits "
                         "(strongreject_test, xstest_unsafe) or paths / demo:harmful")
    a = ap.parse_args()
    s = prepare(a.out.parent / "splits")
    lm = load_model(a.model)
    opts = SafetyOptions(methods=tuple(a.methods.split(",")), n_harmful=a.n, n_benign=a.n_benign,
                         train=TrainOptions(on_policy=a.on_policy, layer=a.layer, gate_layer=a.gate_layer,
                                                 gate_pool=a.gate_pool))
    res = run_safety(lm, [s["advbench_train"], s["strongreject_train"]], [s["alpaca_train"]],
                     [s.get(h, h) for h in a.harmful] if a.harmful else [s["advbench_test"]], {"xstest": [s["xstest_safe"]], "alpaca": [s["alpaca_test"]]}, opts)
    res["machine"] = machine()
    write_report(res, a.out, overwrite=True)
    print((a.out / "report.md").read_text())


if __name__ == "__main__":
    main()
