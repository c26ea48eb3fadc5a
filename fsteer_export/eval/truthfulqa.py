"""TruthfulQA MC1 / MC2 by answer log-likelihood, with 2-fold cross-validation.

Fold f trains every method on one half of the questions (pairs: question, best answer, an
incorrect answer) and scores the other half; the two halves are then swapped, so every question
is scored by a model that never saw it. λ for each method is chosen on the training half's own
validation questions by MC1.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..baselines import build_heads, install
from ..data import Pair, read_records
from ..errors import FSteerError
from ..models import LoadedModel
from ..steering import remove_steering
from ..train import TrainOptions, train
from .scoring import answer_logprobs

TQA_METHODS = ("none", "finesteer", "caa", "mose-only", "scs-only")


@dataclass
class MCQuestion:
    question: str
    mc1: list[tuple[str, int]]
    mc2: list[tuple[str, int]]


@dataclass
class TruthfulOptions:
    methods: Sequence[str] = TQA_METHODS
    limit: int | None = 200  # questions (seeded sample); None: all
    strengths: Sequence[float] = (0.5, 1.0, 2.0, 4.0)
    n_strength_val: int = 40
    incorrect_per_question: int = 1  # training pairs per question: best answer vs k incorrect ones (0: all)
    batch_size: int = 16
    seed: int = 0
    train: TrainOptions = field(default_factory=lambda: TrainOptions(task="truthfulqa"))


def load_mc(path: str | Path) -> list[MCQuestion]:
    """mc_task.json (mc1_targets / mc2_targets) or TruthfulQA.csv (answers split on ';')."""
    rows = read_records(path)
    out = []
    for r in rows:
        if not isinstance(r, dict):
            raise FSteerError(f"{path} is not a TruthfulQA file", "pass TruthfulQA.csv or mc_task.json")
        if "mc1_targets" in r and "mc2_targets" in r:
            out.append(MCQuestion(r["question"], list(r["mc1_targets"].items()), list(r["mc2_targets"].items())))
        elif "Best Answer" in r and "Correct Answers" in r and "Incorrect Answers" in r:
            split = lambda s: [a.strip() for a in (s or "").split(";") if a.strip()]  # noqa: E731
            wrong = split(r["Incorrect Answers"])
            if not wrong:
                continue
            mc1 = [(r["Best Answer"].strip(), 1)] + [(a, 0) for a in wrong]
            mc2 = [(a, 1) for a in split(r["Correct Answers"])] + [(a, 0) for a in wrong]
            out.append(MCQuestion(r["Question"].strip(), mc1, mc2))
        else:
            raise FSteerError(f"{path} is not a TruthfulQA file (columns: {', '.join(map(str, r))})",
                              "pass TruthfulQA.csv or mc_task.json")
    if not out:
        raise FSteerError(f"no questions in {path}", "check the file")
    return out


def mc_scores(questions: Sequence[MCQuestion], logp: dict[tuple[str, str], float],
              with_mc2: bool = True) -> dict[str, float]:
    """MC1: the top-scored mc1 choice is true. MC2: normalised probability mass on true mc2 answers."""
    mc1 = mc2 = 0.0
    for q in questions:
        s1 = [logp[(q.question, a)] for a, _ in q.mc1]
        mc1 += float(q.mc1[max(range(len(s1)), key=s1.__getitem__)][1] == 1)
        if not with_mc2:
            continue
        s2 = torch.tensor([logp[(q.question, a)] for a, _ in q.mc2], dtype=torch.float64)
        p = torch.softmax(s2, 0)
        mc2 += float(sum(p[i] for i, (_, y) in enumerate(q.mc2) if y == 1))
    n = max(1, len(questions))
    return {"mc1": mc1 / n, "mc2": mc2 / n} if with_mc2 else {"mc1": mc1 / n}


def _score(lm: LoadedModel, questions: Sequence[MCQuestion], batch: int, only_mc1: bool = False,
           desc: str = "scoring") -> dict[tuple[str, str], float]:
    pairs = sorted({(q.question, a) for q in questions for a, _ in (q.mc1 if only_mc1 else q.mc1 + q.mc2)})
    vals = answer_logprobs(lm.model, lm.tokenizer, pairs, batch_size=batch, desc=desc)
    return dict(zip(pairs, vals))


def _incorrect(q: MCQuestion, k: int, rng: random.Random) -> list[str]:
    """k of the question's MC1 incorrect answers (seeded), or all of them for k = 0."""
    bad = [a for a, y in q.mc1 if y == 0]
    if k == 1:
        return [rng.choice(bad)]  # the same draws as before this option existed: recorded runs reproduce
    return bad if k <= 0 or k >= len(bad) else rng.sample(bad, k)


def run_truthfulqa(lm: LoadedModel, path: str | Path, opts: TruthfulOptions | None = None) -> dict:
    opts = opts or TruthfulOptions()
    t0 = time.perf_counter()
    questions = load_mc(path)
    rng = random.Random(opts.seed)
    if opts.limit is not None and len(questions) > opts.limit:
        questions = rng.sample(questions, opts.limit)
    else:
        rng.shuffle(questions)
    half = len(questions) // 2
    folds = [(questions[:half], questions[half:]), (questions[half:], questions[:half])]
    remove_steering(lm.model)
    base = _score(lm, questions, opts.batch_size, desc="base")
    per_method: dict[str, dict[tuple[str, str], float]] = {"none": base}
    chosen: dict[str, list[float]] = {}
    for f, (train_q, test_q) in enumerate(folds):
        pairs = [Pair(q.question, next(a for a, y in q.mc1 if y == 1), bad)
                 for q in train_q for bad in _incorrect(q, opts.incorrect_per_question, rng)]
        topts = TrainOptions(**{**opts.train.__dict__, "task": "truthfulqa", "strength": 1.0})
        result = train(lm, [], [], topts, examples=pairs)
        val_q = [q for q in train_q if q.question in set(result.report.get("validation_prompts", []))]
        val_q = val_q[: opts.n_strength_val]
        heads = build_heads(result.head, result.activations, [m for m in opts.methods if m != "none"])
        for name, head in heads.items():
            install(lm.model, name, head, result.config.layer)
            best = (-1.0, 1.0)
            for lam in opts.strengths:  # λ by MC1 on this fold's validation questions
                head.strength = lam
                s = mc_scores(val_q, _score(lm, val_q, opts.batch_size, only_mc1=True, desc=f"{name} λ={lam} (val)"),
                              with_mc2=False)
                if s["mc1"] > best[0] + 1e-9:
                    best = (s["mc1"], lam)
            head.strength = best[1]
            chosen.setdefault(name, []).append(best[1])
            per_method.setdefault(name, {}).update(_score(lm, test_q, opts.batch_size, desc=f"{name} fold {f + 1}"))
            remove_steering(lm.model)
    methods = {name: mc_scores(questions, lp) | ({"strength_per_fold": chosen[name]} if name in chosen else {})
               for name, lp in per_method.items()}
    return {"suite": "truthfulqa", "model": lm.name, "questions": len(questions), "folds": 2,
            "methods": methods, "seconds": {"total": round(time.perf_counter() - t0, 1)}}
