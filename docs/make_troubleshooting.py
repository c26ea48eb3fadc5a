"""Regenerate docs/TROUBLESHOOTING.md by running every failure case through the real `fsteer` CLI.

    python docs/make_troubleshooting.py          # ~1 minute on 2 CPU cores, tiny random models only

Each case builds the broken input in a temporary folder, runs the command in-process (Typer's
CliRunner, so disk-full and Ctrl-C can be simulated by patching), and records the exit code and
the exact stderr line. Temporary paths are shown as ``<tmp>``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

os.environ.setdefault("FSTEER_QUIET", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from safetensors.torch import save_file as st_save  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import fsteer_export.adapter as adapter_mod  # noqa: E402
import fsteer_export.train as train_mod  # noqa: E402
from fsteer_cli.main import app  # noqa: E402
from fsteer_export.testing import save_tiny_model, tiny_model, tiny_tokenizer  # noqa: E402

DOC = Path(__file__).with_name("TROUBLESHOOTING.md")
TRAIN = ["--layer", "2", "--gate-layer", "1", "--gate", "quantile", "--rank", "2", "--strength", "16"]


def main() -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="fsteer-doc-"))
    os.environ["FSTEER_CACHE"] = str(tmp / "cache")
    runner = CliRunner()
    model = save_tiny_model(tmp / "tiny-llama", "llama")
    gpt2 = save_tiny_model(tmp / "tiny-gpt2", "gpt2")
    adapter = tmp / "adapter"
    ok = runner.invoke(app, ["train", "--model", str(model), "--data", "demo:harmful", "--general", "demo:benign",
                             "--out", str(adapter), *TRAIN])
    assert ok.exit_code == 0, ok.output

    def data_file(name: str, content: str | bytes) -> str:
        p = tmp / "data" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(p)

    def broken_adapter(name: str, fn) -> str:
        dst = tmp / "adapters" / name
        shutil.copytree(adapter, dst)
        fn(dst)
        return str(dst)

    def config_edit(**changes):
        def fn(folder):
            cfg = json.loads((folder / "adapter_config.json").read_text())
            for k, v in changes.items():
                if v is None:
                    del cfg[k]
                else:
                    cfg[k] = v
            (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return fn

    def weights_edit(change):
        def fn(folder):
            path = folder / "adapter_model.safetensors"
            tensors = load_file(str(path))
            key = next(k for k in sorted(tensors) if k.endswith("mose.experts"))
            change(tensors, key)
            st_save(tensors, str(path), metadata={"format": "pt"})
        return fn

    def flip_last_byte(folder):
        p = folder / "adapter_model.safetensors"
        raw = bytearray(p.read_bytes())
        raw[-3] ^= 0x10
        p.write_bytes(bytes(raw))

    def nan_model_folder() -> str:
        m = tiny_model("llama")
        with torch.no_grad():
            for p in m.model.layers[1].parameters():
                p.fill_(float("nan"))
        folder = tmp / "nan-model"
        m.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        return str(folder)

    def opt_folder() -> str:
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = AutoConfig.for_model("opt", vocab_size=384, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64)
        folder = tmp / "tiny-opt"
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        return str(folder)

    def other_llama(**kw) -> str:
        folder = tmp / ("llama-" + "-".join(f"{k}{v}" for k, v in kw.items()))
        tiny_model("llama", **kw).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        return str(folder)

    def raise_(exc):
        def f(*a, **k):
            raise exc
        return f

    out = str(tmp / "out")
    train = ["train", "--model", str(model), "--out", out]
    gen = ["generate", "--model", str(model), "--max-new-tokens", "4"]
    many = "\n".join(f"prompt number {i}" for i in range(20))
    cases = [
        ("Data files", None, None, None),
        ("data file missing", train + ["--data", str(tmp / "data" / "nope.csv")], [], "train"),
        ("data file empty", train + ["--data", data_file("empty.jsonl", "")], [], "train"),
        ("data file not UTF-8", train + ["--data", data_file("latin1.csv", "prompt\ncaf\xe9\n".encode("latin-1"))], [], "train"),
        ("data file binary (NUL bytes) / UTF-16", train + ["--data", data_file("utf16.txt", "hi".encode("utf-16-le"))], [], "train"),
        ("CSV with an unclosed quote", train + ["--data", data_file("quote.csv", 'prompt,target\n"never closed,x\nnext,y\n')], [], "train"),
        ("CSV row with too many fields", train + ["--data", data_file("ragged.csv", "prompt,target\na,b,c\n")], [], "train"),
        ("JSON syntax error", train + ["--data", data_file("bad.json", '[{"prompt": "a"},')], [], "train"),
        ("JSON that is not a list of records", train + ["--data", data_file("scalar.json", '"text"')], [], "train"),
        ("JSON list of numbers", train + ["--data", data_file("nums.json", "[1, 2]")], [], "train"),
        ("JSONL bad line", train + ["--data", data_file("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n')], [], "train"),
        ("JSONL line that is not an object", train + ["--data", data_file("list.jsonl", '{"prompt": "a"}\n[1]\n')], [], "train"),
        ("no usable prompt column", train + ["--data", data_file("nocol.csv", "id,label\n1,x\n")], [], "train"),
        ("--prompt-column not in the file", train + ["--data", data_file("cols.csv", "goal,target\nx,y\n"), "--prompt-column", "question"], [], "train"),
        ("unsupported file type", train + ["--data", data_file("data.parquet", "x")], [], "train"),
        ("duplicate prompts (dropped, then too few)", train + ["--data", data_file("dups.txt", "\n".join(f"p{i % 6}" for i in range(30)))], [], "train"),
        ("fewer examples than calibration needs", train + ["--data", data_file("few.txt", "a\nb\nc\nd\n")], [], "train"),
        ("fewer examples than --experts", train + ["--data", data_file("twenty.txt", many), "--experts", "15"], [], "train"),
        ("prompt longer than the model's context (warning; generation goes on)", gen + ["--prompt", "Tell me about bread. " * 200], [], "generate"),
        ("Models and layers", None, None, None),
        ("unknown model alias", ["generate", "--model", "smollm3-135m", "--prompt", "hi"], [], "generate"),
        ("folder that is not a model", ["generate", "--model", str(tmp / "data"), "--prompt", "hi"], [], "generate"),
        ("unknown architecture", ["train", "--model", opt_folder(), "--data", "demo:harmful", "--out", out], [], "train"),
        ("layer index out of range", train + ["--data", "demo:harmful", "--layer", "9"], [], "train"),
        ("gate layer after the steering layer", train + ["--data", "demo:harmful", "--layer", "1", "--gate-layer", "3"], [], "train"),
        ("unknown gate pooling", train + ["--data", "demo:harmful", "--gate-pool", "max"], [], "train"),
        ("NaN activations (broken weights)", ["train", "--model", nan_model_folder(), "--data", "demo:harmful", "--out", out, "--layer", "2", "--gate-layer", "2"], [], "train"),
        ("--max-new-tokens beyond the context", ["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "300"], [], "generate"),
        ("Output folder", None, None, None),
        ("output folder exists", ["train", "--model", str(model), "--data", "demo:harmful", "--out", str(adapter)], [], "train"),
        ("output folder not writable", ["train", "--model", str(model), "--data", "demo:harmful", "--out", str(tmp / "tiny-llama" / "config.json" / "out")], [], "train"),
        ("output folder not writable (permission denied, simulated)", ["train", "--model", str(model), "--data", "demo:harmful", "--out", out],
         [(adapter_mod.tempfile, "mkdtemp", raise_(PermissionError(errno.EACCES, os.strerror(errno.EACCES))))], "train"),
        ("disk full while saving (simulated ENOSPC)", train + ["--data", "demo:harmful", "--general", "demo:benign", *TRAIN],
         [(adapter_mod, "save_file", raise_(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))], "train"),
        ("Ctrl-C during training (simulated)", train + ["--data", "demo:harmful", *TRAIN],
         [(train_mod, "fit_mose", raise_(KeyboardInterrupt()))], "train"),
        ("Ctrl-C while saving (simulated)", train + ["--data", "demo:harmful", "--general", "demo:benign", *TRAIN],
         [(adapter_mod, "save_file", raise_(KeyboardInterrupt()))], "train"),
        ("Adapter folders", None, None, None),
        ("adapter folder missing", ["inspect", str(tmp / "no-adapter")], [], "inspect"),
        ("adapter for another architecture", ["generate", "--model", str(gpt2), "--adapter", str(adapter), "--prompt", "hi"], [], "generate"),
        ("adapter for another hidden size", ["generate", "--model", other_llama(hidden=64), "--adapter", str(adapter), "--prompt", "hi"], [], "generate"),
        ("adapter for another number of layers", ["generate", "--model", other_llama(layers=6), "--adapter", str(adapter), "--prompt", "hi"], [], "generate"),
        ("adapter_config.json truncated", ["inspect", broken_adapter("trunc-config", lambda f: (f / "adapter_config.json").write_text('{"layer": 2, "gate'))], [], "inspect"),
        ("adapter_config.json missing a field", ["inspect", broken_adapter("no-layer", config_edit(layer=None))], [], "inspect"),
        ("adapter_config.json field of the wrong type", ["inspect", broken_adapter("str-layer", config_edit(layer="2"))], [], "inspect"),
        ("adapter_config.json of another PEFT method", ["inspect", broken_adapter("lora", config_edit(peft_type="LORA"))], [], "inspect"),
        ("adapter_config.json edited (gate kind) after saving", ["inspect", broken_adapter("edited", config_edit(gate_kind="soft"))], [], "inspect"),
        ("safetensors missing a tensor", ["inspect", broken_adapter("missing", weights_edit(lambda t, k: t.pop(k)))], [], "inspect"),
        ("safetensors tensor of the wrong shape", ["inspect", broken_adapter("shape", weights_edit(lambda t, k: t.__setitem__(k, torch.zeros(32, 5))))], [], "inspect"),
        ("safetensors tensor of the wrong dtype", ["inspect", broken_adapter("dtype", weights_edit(lambda t, k: t.__setitem__(k, t[k].int())))], [], "inspect"),
        ("safetensors with NaN / Inf", ["inspect", broken_adapter("nan", weights_edit(lambda t, k: t[k].__setitem__((0, 0), float("nan"))))], [], "inspect"),
        ("safetensors bytes corrupted (checksum)", ["inspect", broken_adapter("flip", flip_last_byte)], [], "inspect"),
        ("safetensors truncated", ["inspect", broken_adapter("trunc-weights", lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:100]))], [], "inspect"),
        ("pickle weights (.bin) instead of safetensors", ["inspect", broken_adapter("bin", lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"))],
         [(torch, "load", raise_(AssertionError("torch.load called")))], "inspect"),
        ("Bugs", None, None, None),
        ("an unexpected exception (a bug)", ["inspect", str(adapter)], [(adapter_mod, "adapter_summary", raise_(RuntimeError("example failure")))], "inspect"),
    ]

    rows = ["# Troubleshooting", "",
            "Every problem `fsteer` can diagnose ends in **one line** on stderr, `error: <what is wrong, the value seen>"
            " — fix: <what to do>`, and a non-zero exit: **2** for a user error, **130** for Ctrl-C, **1** for a bug."
            " Nothing is half-written: adapters are saved to a hidden temporary folder that is renamed into place only"
            " when complete (an `--overwrite` that fails leaves the old folder untouched), and a bad adapter is refused"
            " before anything is attached to the model. Run `fsteer --debug …` to see the full traceback instead."
            " Fix-ups the tool makes for you (duplicate prompts dropped, over-long prompts truncated from the left,"
            " keeping the chat template's end) are stated as `warning: …` lines.", "",
            "Adapters are checked completely before use: JSON types and ranges, that the adapter fits the model"
            " (architecture, hidden size, layer count), every tensor's name, shape, dtype and finiteness, and a SHA-256"
            " checksum (stored in the safetensors metadata) over the tensors and the layer / gate fields. Pickle files"
            " (`.bin`, `.pt`, …) are never loaded. `trust_remote_code` is off unless `--trust-remote-code` is given.", "",
            "Generated by `python docs/make_troubleshooting.py`, which runs each case through the real CLI on tiny"
            " random models (temporary paths shown as `<tmp>`).", ""]
    header = ["| Case | Command (abridged) | Exit | What `fsteer` prints |", "|---|---|---|---|"]
    for name, args, patches, cmd in cases:
        if args is None:
            rows += ["", f"## {name}", "", *header]
            continue
        shutil.rmtree(out, ignore_errors=True)
        with ExitStack() as stack:
            for obj, attr, value in patches:
                stack.enter_context(mock.patch.object(obj, attr, value))
            result = runner.invoke(app, args)
        lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "warning:", "interrupted:"))]
        assert lines, (name, result.output)
        assert "Traceback" not in result.output, name
        text = "<br>".join(f"`{line}`" for line in lines).replace(str(tmp), "<tmp>").replace("|", "\\|")
        shown = " ".join(a if len(a) < 48 else a[:45] + "…" for a in (x.replace(str(tmp), "<tmp>") for x in args))
        shown = shown.replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {name} | `fsteer {shown}` | {result.exit_code} | {text} |")
        print(f"{result.exit_code:>4}  {name}", file=sys.stderr)
    DOC.write_text("\n".join(rows) + "\n", encoding="utf-8")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
