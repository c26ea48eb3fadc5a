"""results.json + report.md + PNG plots for an evaluation run (written atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapter import atomic_folder
from ..plots import expert_usage, gate_histogram, tradeoff


def _pct(v) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) else "–"


def _table(methods: dict[str, dict], columns: list[tuple[str, str]]) -> str:
    head = "| method | " + " | ".join(label for _, label in columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    rows = []
    for name, m in methods.items():
        cells = []
        for key, _ in columns:
            v = m.get(key)
            cells.append(f"{v:g}" if key == "strength" and isinstance(v, (int, float)) else _pct(v))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows])


def _changed_lines(m: dict) -> list[str]:
    """The benign prompts FineSteer's gate let through, with what became of them."""
    changed = m.get("benign_changed")
    if not changed:
        return []
    lines = ["", "Benign prompts whose FineSteer output differs from the base model's:", ""]
    for c in changed:
        what = "refusal" if c["refusal"] else "changed, not a refusal"
        if c["base_refusal"]:
            what += " (the base model refused too)"
        text = " ".join(c["prompt"].split())
        lines.append(f"- [{c['set']}] {text[:120]}{'…' if len(text) > 120 else ''} — {what}")
    return lines


def markdown(results: dict) -> str:
    suite = results["suite"]
    lines = [f"# fsteer evaluation: {suite}", "", f"Model: `{results.get('model')}`", ""]
    if suite == "safety":
        sets = [k for k in results["counts"] if k != "harmful"]
        cols = [("harmful_refusal", "harmful refusal %")]
        cols += [(f"{s}_refusal", f"{s} refusal %") for s in sets]
        cols += [("benign_identical", "benign identical %"), ("gate_fire_harmful", "fires on harmful %"),
                 ("gate_fire_benign", "fires on benign %"), ("strength", "λ")]
        d = results["detection"]
        lines += [f"Test prompts: {results['counts']}. Judge: `{results['judge']}`, {results['max_new_tokens']} new tokens, greedy.",
                  f"Steering layer {results['layer']}, gate layer {results['gate_layer']}.", "",
                  _table(results["methods"], cols), "",
                  f"FineSteer gate on the test prompts: TPR {_pct(d['tpr'])} %, FPR {_pct(d['fpr'])} %, ROC AUC {d['roc_auc']:.3f}.",
                  *_changed_lines(results["methods"].get("finesteer", {})),
                  "", "![trade-off](tradeoff.png)", "", "![gate scores](gate_scores.png)", "",
                  "![expert usage](expert_usage.png)"]
    elif suite == "truthfulqa":
        lines += [f"{results['questions']} questions, 2-fold cross-validation (train on one half, score the other).", "",
                  _table(results["methods"], [("mc1", "MC1 %"), ("mc2", "MC2 %")])]
    else:
        m = results["methods"]
        lines += [f"{results['questions']} questions across {results['subjects']} subjects.", "",
                  _table(m, [("accuracy", "accuracy %"), ("changed_answers", "answers changed %")])]
        if "finesteer" in m:
            lines += ["", f"Gate firing rate on these questions: {m['finesteer']['gate_fire_rate']}"]
    lines += ["", f"Run time: {results.get('seconds')} s", ""]
    return "\n".join(lines)


def write_report(results: dict, out: str | Path, overwrite: bool = False) -> Path:
    with atomic_folder(out, overwrite) as tmp:
        slim = {k: v for k, v in results.items() if k not in ("train_report",)}
        (tmp / "results.json").write_text(json.dumps(slim, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(markdown(results))
        if results["suite"] == "safety":
            tradeoff({k: [tuple(p) for p in v] for k, v in results["curves"].items()}, tmp / "tradeoff.png")
            gate_histogram({"harmful (test)": results["gate_scores"]["harmful"],
                            "benign (test)": results["gate_scores"]["benign"]},
                           results["detection"].get("threshold"), tmp / "gate_scores.png", "FineSteer gate scores")
            expert_usage(results["expert_usage"], tmp / "expert_usage.png",
                         "MoSE expert usage on harmful test prompts")
    return Path(out)
