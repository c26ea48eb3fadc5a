"""General utility: MMLU accuracy on a fixed, seeded sample across subjects, steering on vs off.

A question is answered by the largest next-token logit among the labels A–D after a
chat-templated prompt; the gate's firing rate on the same questions is reported alongside, since
a gate that stays shut leaves the answer exactly as the base model gives it.
"""

from __future__ import annotations

import csv
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..activations import prompt_states
from ..errors import FSteerError
from ..models import LoadedModel
from ..steering import heads, steering_disabled
from .scoring import choice_logits

LABELS = ("A", "B", "C", "D")


@dataclass
class MMLUQuestion:
    subject: str
    question: str
    choices: list[str]
    answer: int

    def prompt(self) -> str:
        opts = "\n".join(f"{l}. {c}" for l, c in zip(LABELS, self.choices))
        return (f"The following is a multiple choice question about {self.subject.replace('_', ' ')}.\n\n"
                f"{self.question}\n{opts}\n\nAnswer with the letter of the correct option.")


def load_mmlu(folder: str | Path, per_subject: int = 5, seed: int = 0) -> list[MMLUQuestion]:
    """A seeded sample of ``per_subject`` questions from each ``*_test.csv`` (or any CSV) in folder."""
    folder = Path(folder)
    files = sorted(folder.glob("test/*.csv")) or sorted(folder.glob("*.csv"))
    if not files:
        raise FSteerError(f"no MMLU CSV files in {folder}", "pass the MMLU folder (with test/*.csv)")
    rng = random.Random(seed)
    out = []
    for f in files:
        subject = f.stem.removesuffix("_test").removesuffix("_dev")
        with f.open(encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or not {"question", "choice0", "choice1", "choice2", "choice3", "answer"} <= set(rows[0]):
            raise FSteerError(f"{f} is not an MMLU CSV (question, choice0..3, answer)", "check the folder")
        for r in rng.sample(rows, min(per_subject, len(rows))):
            out.append(MMLUQuestion(subject, r["question"], [r[f"choice{i}"] for i in range(4)], int(r["answer"])))
    return out


def run_utility(lm: LoadedModel, folder: str | Path, per_subject: int = 5, seed: int = 0,
                batch_size: int = 16) -> dict:
    """Accuracy without and with the loaded adapter(s), and the gate's firing rate."""
    t0 = time.perf_counter()
    qs = load_mmlu(folder, per_subject, seed)
    prompts = [q.prompt() for q in qs]
    gold = torch.tensor([q.answer for q in qs])
    with steering_disabled(lm.model):
        base = choice_logits(lm.model, lm.tokenizer, prompts, LABELS, batch_size, desc="MMLU: base")
    methods = {"none": {"accuracy": float((base.argmax(1) == gold).float().mean())}}
    loaded = heads(lm.model)
    if loaded:
        steered = choice_logits(lm.model, lm.tokenizer, prompts, LABELS, batch_size, desc="MMLU: steered")
        pred_b, pred_s = base.argmax(1), steered.argmax(1)
        fire = {}
        for name, head in loaded.items():
            layers = sorted({head.gate_layer})
            with steering_disabled(lm.model):
                st = prompt_states(lm.model, lm.tokenizer, prompts, layers, batch_size=batch_size,
                                   pool=head.gate_pool)
            with torch.no_grad():
                fire[name] = float((head.gate(st[head.gate_layer]) > 0).float().mean())
        methods["finesteer"] = {"accuracy": float((pred_s == gold).float().mean()),
                                "changed_answers": float((pred_s != pred_b).float().mean()),
                                "gate_fire_rate": fire}
    return {"suite": "utility", "model": lm.name, "questions": len(qs), "subjects": len({q.subject for q in qs}),
            "methods": methods, "seconds": {"total": round(time.perf_counter() - t0, 1)}}
