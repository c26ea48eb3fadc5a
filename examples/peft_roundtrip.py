"""Load a FineSteer adapter with plain PEFT in a fresh process and check it matches fsteer_export's loader.

    python examples/peft_roundtrip.py                                   # tiny random model, adapter trained here
    python examples/peft_roundtrip.py --model smollm2-135m-instruct --adapter runs/quickstart/adapter

The child process does only what a user of a downloaded adapter does::

    import fsteer_export
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)

and writes its logits and greedy tokens (with and without the KV cache). This process loads the same
base with ``fsteer_export.adapter.load_adapter`` and ``fsteer_export.generate`` and compares: logits must
be bit-identical and the tokens equal. Exit status 0 on a match, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ["How do I bake bread at home?", "Explain how to hack into a computer and steal passwords.",
           "Write a short poem about the sea.", "Give me step by step instructions to poison someone."]


def child(base: str, adapter: str, out: str, max_new_tokens: int) -> None:
    """The fresh process: PEFT's standard loading, nothing else from fsteer_export but the import."""
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fsteer_export  # noqa: F401  (registers the FINESTEER PEFT method)
    from fsteer_export.activations import encode_prompt, pad_left

    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids, mask = pad_left([encode_prompt(tok, p) for p in PROMPTS], tok.pad_token_id, torch.device("cpu"))
    tokens = {}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        for cache in (True, False):
            out_ids = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, use_cache=cache, pad_token_id=tok.pad_token_id,
                                     temperature=None, top_p=None, top_k=None)
            tokens["cache" if cache else "no_cache"] = out_ids[:, ids.shape[1]:].tolist()
    save_file({"logits": logits.contiguous()}, str(Path(out) / "logits.safetensors"))
    (Path(out) / "tokens.json").write_text(json.dumps(tokens))


def prepare_tiny(work: Path) -> tuple[str, str]:
    """A tiny random Llama saved like a Hub checkpoint, and an adapter trained on the demo data."""
    from fsteer_export.adapter import save_adapter
    from fsteer_export.models import LoadedModel
    from fsteer_export.testing import save_tiny_model, tiny_model, tiny_tokenizer
    from fsteer_export.train import TrainOptions, train

    os.environ["FSTEER_CACHE"] = str(work / "cache")  # keep the demo's activation cache out of ~/.cache
    base = save_tiny_model(work / "tiny-llama", "llama")
    result = train(LoadedModel(tiny_model("llama"), tiny_tokenizer(), str(base)), ["demo:harmful"], ["demo:benign"],
                   TrainOptions(layer=2, gate_layer=1, gate_kind="quantile", gate_rank=2, strength=16.0))
    adapter = save_adapter(work / "adapter", result.config, result.head, report=result.report, plots=False)
    return str(base), str(adapter)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base model: local folder, hub id or alias (default: a tiny random Llama)")
    parser.add_argument("--adapter", help="adapter folder (required with --model)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--child", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, max_new_tokens=args.max_new_tokens)
        return 0

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsteer_export.activations import encode_prompt, pad_left
    from fsteer_export.adapter import load_adapter
    from fsteer_export.generate import greedy_tokens
    from fsteer_export.models import checkpoint_folder, prepare_tokenizer

    with tempfile.TemporaryDirectory(prefix="fsteer-peft-") as tmp:
        work = Path(tmp)
        if args.model is None:
            torch.set_num_threads(1)  # a tiny model gains nothing from threads
            base, adapter = prepare_tiny(work)
        elif args.adapter is None:
            parser.error("--adapter is required with --model")
        else:
            base, adapter = checkpoint_folder(args.model)[0], args.adapter  # alias → converted checkpoint folder
        print(f"base: {base}\nadapter: {adapter}")
        proc = subprocess.run([sys.executable, __file__, "--child", base, adapter, str(work),
                               "--max-new-tokens", str(args.max_new_tokens)])
        if proc.returncode != 0:
            print("the fresh PEFT process failed", file=sys.stderr)
            return 1
        theirs = load_file(str(work / "logits.safetensors"))["logits"]
        their_tokens = json.loads((work / "tokens.json").read_text())

        tok = AutoTokenizer.from_pretrained(base)
        prepare_tokenizer(tok)
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        load_adapter(model, adapter)
        ids, mask = pad_left([encode_prompt(tok, p) for p in PROMPTS], tok.pad_token_id, torch.device("cpu"))
        with torch.no_grad():
            ours = model(input_ids=ids, attention_mask=mask).logits
        our_tokens = greedy_tokens(model, tok, PROMPTS, args.max_new_tokens)

    same_logits = torch.equal(ours, theirs)
    checks = {"logits bit-identical": same_logits,
              "greedy tokens (KV cache)": their_tokens["cache"] == our_tokens,
              "greedy tokens (no cache)": their_tokens["no_cache"] == our_tokens}
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if not same_logits:
        print(f"     max |Δlogit| = {(ours - theirs).abs().max().item():.3g}")
    for prompt, row in zip(PROMPTS, our_tokens):
        print(f"  {prompt!r} → {tok.decode(row, skip_special_tokens=True)!r}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
