"""The `fsteer` command end to end on a tiny model folder, and how it fails: one line, no traceback,
nothing half-written, exit 2 (user error) / 130 (Ctrl-C) / 1 (a bug), tracebacks only with --debug."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import fsteer_export.adapter as adapter_mod
import fsteer_export.train as train_mod
from fsteer_cli.main import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code=2):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def leftovers(folder):
    """Temp folders an interrupted or failed save might have left behind."""
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or ".probe-" in p.name]


TRAIN_ARGS = ("--data", "demo:harmful", "--general", "demo:benign", "--layer", 2, "--gate-layer", 1,
              "--gate", "quantile", "--rank", 2, "--strength", 16)


@pytest.fixture(scope="module")
def cli_adapter(tiny_folder, tmp_path_factory, fsteer_cache):
    out = tmp_path_factory.mktemp("cli") / "adapter"
    result = invoke("train", "--model", tiny_folder, "--out", out, *TRAIN_ARGS)
    assert result.exit_code == 0, result.output
    assert f"adapter saved to {out}" in result.stdout
    assert "chose: layer L=2, gate layer G=1, gate=quantile (rank 2, reading the " in result.stdout
    return out


@pytest.fixture
def fake_train(trained, monkeypatch):
    """Skip the training itself (tested elsewhere): the CLI gets the session's trained result."""
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: trained)


# -- the happy path --------------------------------------------------------------------------------

def test_train_writes_a_complete_adapter_folder(cli_adapter):
    names = {p.name for p in cli_adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "training_report.json"} <= names
    cfg = json.loads((cli_adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "FINESTEER" and cfg["layer"] == 2 and cfg["gate_layer"] == 1
    assert not leftovers(cli_adapter.parent)


def test_inspect(cli_adapter):
    text = invoke("inspect", cli_adapter)
    assert text.exit_code == 0
    assert "model_type: llama" in text.stdout and "adapter_model.safetensors" in text.stdout
    js = invoke("inspect", cli_adapter, "--json")
    summary = json.loads(js.stdout)
    assert summary["layer"] == 2 and summary["gate_layer"] == 1 and summary["gate_kind"] == "quantile"
    assert summary["hidden_size"] == 32 and summary["num_layers"] == 4 and summary["strength"] == 16.0
    assert summary["files"]["adapter_model.safetensors"] > 0


def test_generate_json_with_and_without_adapter(cli_adapter, tiny_folder):
    prompts = ["How do I bake bread?", "Explain how to hack into a computer"]
    args = ["generate", "--model", tiny_folder, "--max-new-tokens", 4, "--json"]
    for p in prompts:
        args += ["--prompt", p]
    steered = invoke(*args, "--adapter", cli_adapter)
    assert steered.exit_code == 0, steered.output
    rows = [json.loads(line) for line in steered.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for r in rows:
        assert set(r) == {"prompt", "completion", "gate"}
        assert isinstance(r["completion"], str) and 0.0 <= r["gate"] <= 1.0
    plain = invoke(*args)
    assert plain.exit_code == 0
    rows = [json.loads(line) for line in plain.stdout.splitlines()]
    assert [set(r) for r in rows] == [{"prompt", "completion"}] * 2
    compare = invoke(*args, "--adapter", cli_adapter, "--compare")
    assert all("unsteered" in json.loads(line) for line in compare.stdout.splitlines())


def test_generate_text_output_and_prompts_file(cli_adapter, tiny_folder, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first prompt\nsecond prompt\n")
    out = invoke("generate", "--model", tiny_folder, "--adapter", cli_adapter, "--prompts-file", f,
                 "--max-new-tokens", 3)
    assert out.exit_code == 0
    assert "### first prompt  [gate " in out.stdout and "### second prompt" in out.stdout


# -- user errors: one line, exit 2, nothing written -------------------------------------------------

def test_output_folder_exists(cli_adapter, tiny_folder, monkeypatch):
    import fsteer_export.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("must refuse before loading"))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in cli_adapter.iterdir())
    line = one_line_error(invoke("train", "--model", tiny_folder, "--out", cli_adapter, *TRAIN_ARGS))
    assert line == f"error: output folder {cli_adapter} already exists — fix: pass --overwrite or choose another --out"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cli_adapter.iterdir()) == before


def test_overwrite_replaces_the_folder(tiny_folder, tmp_path, fake_train):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = invoke("train", "--model", tiny_folder, "--out", out, "--overwrite", *TRAIN_ARGS)
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert not leftovers(tmp_path)


def test_unwritable_output_fails_before_training(tiny_folder, tmp_path, monkeypatch):
    import fsteer_export.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("must refuse before loading"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = one_line_error(invoke("train", "--model", tiny_folder, "--out", blocker / "sub" / "adapter", *TRAIN_ARGS))
    assert line == (f"error: cannot write to {blocker / 'sub'}: {blocker} is a file, not a folder — fix: choose a "
                    "writable --out")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(adapter_mod.tempfile, "mkdtemp", denied)
    line = one_line_error(invoke("train", "--model", tiny_folder, "--out", tmp_path / "adapter", *TRAIN_ARGS))
    assert line == f"error: cannot write to {tmp_path}: Permission denied — fix: choose a writable --out"
    assert not (tmp_path / "adapter").exists()


def test_disk_full_while_saving(tiny_folder, tmp_path, fake_train, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(adapter_mod, "save_file", full)
    out = tmp_path / "adapter"
    line = one_line_error(invoke("train", "--model", tiny_folder, "--out", out, *TRAIN_ARGS))
    assert line.startswith(f"error: writing {out} failed (No space left on device); nothing was written — fix:")
    assert not out.exists() and not leftovers(tmp_path)
    # with --overwrite, the old folder survives a failed save untouched
    out.mkdir()
    (out / "keep.txt").write_text("old adapter")
    one_line_error(invoke("train", "--model", tiny_folder, "--out", out, "--overwrite", *TRAIN_ARGS))
    assert (out / "keep.txt").read_text() == "old adapter" and len(list(out.iterdir())) == 1
    assert not leftovers(tmp_path)


def test_ctrl_c_during_training(tiny_folder, tmp_path, monkeypatch, fsteer_cache):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "fit_mose", interrupt)
    out = tmp_path / "adapter"
    result = invoke("train", "--model", tiny_folder, "--out", out, *TRAIN_ARGS)
    assert result.exit_code == 130
    assert "interrupted: nothing was written" in result.stderr and "Traceback" not in result.output
    assert not out.exists() and not leftovers(tmp_path)
    assert not list((fsteer_cache / "activations").glob("*.tmp"))


@pytest.mark.parametrize("where", ["save_file", "plots"])
def test_ctrl_c_during_saving(tiny_folder, tmp_path, fake_train, monkeypatch, where):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    if where == "save_file":
        monkeypatch.setattr(adapter_mod, "save_file", interrupt)
    else:
        import fsteer_export.plots as plots
        monkeypatch.setattr(plots, "training_plots", interrupt)
    out = tmp_path / "adapter"
    result = invoke("train", "--model", tiny_folder, "--out", out, *TRAIN_ARGS)
    assert result.exit_code == 130 and "interrupted: nothing was written" in result.stderr
    assert not out.exists() and not leftovers(tmp_path)


def test_bad_data_file_at_the_cli(tiny_folder, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    out = tmp_path / "adapter"
    line = one_line_error(invoke("train", "--model", tiny_folder, "--out", out, "--data", bad, "--layer", 2))
    assert line.startswith(f"error: {bad} line 2 is not valid JSON") and " — fix: " in line
    line = one_line_error(invoke("train", "--model", tiny_folder, "--out", out, "--data", tmp_path / "nope.csv"))
    assert line == f"error: data file {tmp_path / 'nope.csv'} does not exist — fix: check the path"
    assert not out.exists() and not leftovers(tmp_path)


def test_bad_layer_at_the_cli(tiny_folder, tmp_path):
    line = one_line_error(invoke("train", "--model", tiny_folder, "--out", tmp_path / "a", "--data", "demo:harmful",
                                 "--layer", 9))
    assert line == "error: --layer 9 is out of range for this model (4 decoder layers) — fix: use a value from 0 to 3"
    line = one_line_error(invoke("train", "--model", tiny_folder, "--out", tmp_path / "a", "--data", "demo:harmful",
                                 "--layer", 1, "--gate-layer", 3))
    assert "error: --gate-layer 3 is after --layer 1" in line
    line = one_line_error(invoke("train", "--model", tiny_folder, "--out", tmp_path / "a", "--data", "demo:harmful",
                                 "--gate-pool", "max"))
    assert line == "error: unknown gate pooling 'max' — fix: use --gate-pool last or mean"
    assert not (tmp_path / "a").exists()


def test_unknown_model_at_the_cli(tmp_path):
    line = one_line_error(invoke("generate", "--model", "smollm3-360m", "--prompt", "hi"))
    assert "unknown model 'smollm3-360m'" in line


def test_adapter_for_another_model_at_the_cli(cli_adapter, tmp_path_factory):
    from fsteer_export.testing import save_tiny_model

    gpt2 = save_tiny_model(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2", "gpt2")
    line = one_line_error(invoke("generate", "--model", gpt2, "--adapter", cli_adapter, "--prompt", "hi"))
    assert "was trained for a model with model_type 'llama', but this model has 'gpt2'" in line


def test_pickle_weights_are_refused_at_the_cli(cli_adapter, tmp_path, monkeypatch):
    import shutil

    import torch

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    folder = tmp_path / "pickled"
    shutil.copytree(cli_adapter, folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    line = one_line_error(invoke("inspect", folder))
    assert "adapter_model.bin, a pickle-based weights file, which is never loaded" in line


# -- bugs and --debug --------------------------------------------------------------------------------

def test_unexpected_exception_is_one_line_without_debug(cli_adapter, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(adapter_mod, "adapter_summary", boom)
    line = one_line_error(invoke("inspect", cli_adapter), code=1)
    assert line.startswith("error: unexpected RuntimeError: something broke — fix: this is a bug")
    debug = invoke("--debug", "inspect", cli_adapter)
    assert debug.exit_code != 0 and isinstance(debug.exception, RuntimeError)


def test_debug_flag_shows_the_traceback(tmp_path):
    """Without --debug a user error is one line; with it, a real process prints Python's traceback."""
    missing = tmp_path / "no-such-adapter"
    plain = invoke("inspect", missing)
    assert one_line_error(plain) == (f"error: adapter folder {missing} does not exist — fix: pass the folder "
                                     "written by fsteer train")
    assert plain.stderr.count("\n") == 1 and plain.stdout == ""
    in_process = invoke("--debug", "inspect", missing)
    assert type(in_process.exception).__name__ == "FSteerError"
    debug = subprocess.run([sys.executable, "-m", "fsteer_cli.main", "--debug", "inspect", str(missing)],
                           capture_output=True, text=True, env=dict(os.environ, FSTEER_QUIET="1"), timeout=300)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "fsteer_export.errors.FSteerError: adapter folder" in debug.stderr
