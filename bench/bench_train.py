"""Training time on ~500 prompts (AdvBench + StrongREJECT training splits, Alpaca as --general),
and extraction throughput vs a plain forward pass at the same batch size.

    .venv/bin/python bench/bench_train.py --out bench/out/train
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write  # noqa: E402
from prepare_splits import prepare  # noqa: E402

from fsteer_export.activations import encode_prompt, pad_left, pair_activations  # noqa: E402
from fsteer_export.data import compliant_answers, load_many, safety_pairs, target_prefixes  # noqa: E402
from fsteer_export.models import load_model  # noqa: E402
from fsteer_export.train import TrainOptions, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/out/train"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    a = ap.parse_args()
    import os
    os.environ.setdefault("FSTEER_CACHE", str(a.out / "cache"))  # a cold activation cache
    splits = prepare(a.out / "splits")
    lm = load_model(a.model)
    data = [splits["advbench_train"], splits["strongreject_train"]]
    t0 = time.perf_counter()
    result = train(lm, data, [splits["alpaca_train"]], TrainOptions())
    wall = time.perf_counter() - t0

    # Extraction throughput vs a plain forward pass over the same sequences and batch size.
    prompts = load_many(data)[:128]
    targets = {}
    for p in data:
        targets.update(target_prefixes(p))
    pairs = safety_pairs(prompts, compliant_answers(prompts, targets))
    bs, layer = 32, result.config.layer
    t1 = time.perf_counter()
    pair_activations(lm.model, lm.tokenizer, pairs, [layer], [layer], batch_size=bs)
    t_extract = time.perf_counter() - t1
    seqs = []
    for p in pairs:
        q = encode_prompt(lm.tokenizer, p.prompt)
        for ans in (p.positive, p.negative):
            seqs.append(q + lm.tokenizer(ans, add_special_tokens=False)["input_ids"][:32])
    seqs.sort(key=len)
    t2 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(seqs), bs):
            ids, mask = pad_left(seqs[i:i + bs], lm.tokenizer.pad_token_id, "cpu")
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    t_forward = time.perf_counter() - t2
    r = result.report
    res = {"prompts": r["counts"], "wall_s": round(wall, 1), "stages_s": r["timings_s"],
           "chosen": {k: r[k] for k in ("layer", "gate_layer", "gate_kind", "gate_rank", "experts", "strength")},
           "extraction_s": round(t_extract, 2), "plain_forward_s": round(t_forward, 2),
           "extraction_throughput_vs_forward": round(t_forward / t_extract, 3)}
    md = (f"# Training time\n\n{sum(r['counts'].values())} prompts ({r['counts']}), wall {wall:.1f} s; stages {r['timings_s']}.\n"
          f"Chosen: {res['chosen']}.\n\nExtraction of 256 sequences at batch {bs}: {t_extract:.1f} s vs a plain "
          f"forward pass {t_forward:.1f} s → throughput ratio {res['extraction_throughput_vs_forward']:.2f}× "
          f"(extraction stops after layer L and skips the LM head).")
    write(a.out, "train", res, md)


if __name__ == "__main__":
    main()
