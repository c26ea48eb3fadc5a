"""Shared fixtures: tiny random models (offline), one trained adapter per session, an isolated cache.

Everything here runs on CPU in seconds. The trained adapter uses a high strength so that steering
visibly changes greedy output on the rows where its gate fires.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FSTEER_QUIET", "1")
# Tiny models gain nothing from threads, and the test machines are shared: one thread is faster
# and keeps results independent of the core count. FSTEER_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("FSTEER_TEST_THREADS", "1")))

# The one trained adapter every core test shares: L = 2, G = 1 (< L), quantile gate of rank 2
# (on the tiny random model this fires on some prompts and not on others), λ = 16 (large enough
# that every prompt the gate fires on gets a different greedy answer).
TRAIN_KW = dict(layer=2, gate_layer=1, gate_kind="quantile", gate_rank=2, strength=16.0, seed=0, gate_pool="last")


@pytest.fixture(scope="session")
def train_kw() -> dict:
    return dict(TRAIN_KW)


@pytest.fixture(scope="session")
def fsteer_cache(tmp_path_factory):
    """Point FSTEER_CACHE at a fresh session folder: the activation cache starts empty.

    Converted checkpoints (the SmolLM2 GGUF → safetensors conversion, ~20 s) are linked in from
    the real cache, so slow tests on the real model do not convert again every session.
    """
    from fsteer_export.models import cache_dir

    folder = tmp_path_factory.mktemp("fsteer_cache")
    real = cache_dir()
    if real.is_dir():
        for entry in real.iterdir():
            if entry.name != "activations" and entry.is_dir() and (entry / "config.json").is_file():
                (folder / entry.name).symlink_to(entry, target_is_directory=True)
    before = os.environ.get("FSTEER_CACHE")
    os.environ["FSTEER_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("FSTEER_CACHE", None)
    else:
        os.environ["FSTEER_CACHE"] = before


@pytest.fixture(scope="session")
def tok():
    from fsteer_export.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def llama():
    """A fresh tiny Llama (same seeded weights every time)."""
    from fsteer_export.testing import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="session")
def trained(fsteer_cache, tok):
    """A FineSteer adapter trained on the built-in demo sets for the tiny Llama."""
    from fsteer_export.models import LoadedModel
    from fsteer_export.testing import tiny_model
    from fsteer_export.train import TrainOptions, train

    return train(LoadedModel(tiny_model("llama"), tok, "tiny-llama"), ["demo:harmful"], ["demo:benign"],
                 TrainOptions(**TRAIN_KW))


@pytest.fixture(scope="session")
def trained_mean(fsteer_cache, tok):
    """The same, with the gate reading the mean over the prompt's tokens (gate_pool="mean").

    On a random tiny model the prompt means are alike and the trained gate fires on every demo
    prompt, so it is re-calibrated to fire on the half of 16 demo prompts with the higher score:
    the per-row tests then see both gate values."""
    from fsteer_export.activations import prompt_states
    from fsteer_export.data import demo_prompts
    from fsteer_export.models import LoadedModel
    from fsteer_export.testing import tiny_model
    from fsteer_export.train import TrainOptions, train

    lm = LoadedModel(tiny_model("llama"), tok, "tiny-llama")
    result = train(lm, ["demo:harmful"], ["demo:benign"], TrainOptions(**{**TRAIN_KW, "gate_pool": "mean"}))
    pool = demo_prompts("harmful")[:8] + demo_prompts("benign")[:8]
    g = result.config.gate_layer
    with torch.no_grad():
        s, _ = result.head.gate.project(prompt_states(lm.model, tok, pool, [g], pool="mean")[g])
    result.head.gate.calib_scores.fill_(float(s.median()))
    return result


@pytest.fixture(scope="session")
def adapter_dir(trained, tmp_path_factory):
    """The trained adapter saved as a folder (config + safetensors + card); treat it as read-only."""
    from fsteer_export.adapter import save_adapter

    out = tmp_path_factory.mktemp("adapter") / "tiny-adapter"
    save_adapter(out, trained.config, trained.head, report=trained.report, plots=False)
    return out


@pytest.fixture
def adapter_copy(adapter_dir, tmp_path):
    """A writable copy of the trained adapter folder."""
    dst = tmp_path / "adapter"
    shutil.copytree(adapter_dir, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer saved like a Hub checkpoint, for the CLI's --model."""
    from fsteer_export.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")
