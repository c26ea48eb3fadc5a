"""`fsteer push`: validation first, then create_repo + upload_folder (mocked: no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fsteer_export.errors import FSteerError
from fsteer_export.hub import push_adapter


class FakeApi:
    """Records what HfApi would send; selects files with huggingface_hub's own pattern filter."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None) -> None:
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, "token": self.token, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, folder_path, repo_id, ignore_patterns=None, allow_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS  # what upload_folder adds

        root = Path(folder_path)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        chosen = list(filter_repo_objects(files, allow_patterns=allow_patterns,
                                          ignore_patterns=list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS))
        FakeApi.calls.append(("upload_folder", {"repo_id": repo_id, "files": chosen, **kwargs}))

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        FakeApi.calls.append(("upload_file", {"repo_id": repo_id, "path_in_repo": path_in_repo,
                                              "content": path_or_fileobj}))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi.calls


def test_push_uploads_the_adapter_files(adapter_copy, fake_hub):
    (adapter_copy / "adapter_model.bin").write_bytes(b"pickle")  # never uploaded
    (adapter_copy / ".tiny-adapter.tmp-123").mkdir()
    (adapter_copy / ".tiny-adapter.tmp-123" / "junk").write_text("x")
    (adapter_copy / "training_report.json").write_text("{}")
    url = push_adapter(adapter_copy, "me/tiny-finesteer", private=True, token="hf_test")
    assert url == "https://huggingface.co/me/tiny-finesteer"
    (kind, repo), (kind2, upload) = fake_hub
    assert kind == "create_repo" and repo["repo_id"] == "me/tiny-finesteer"
    assert repo["private"] is True and repo["exist_ok"] is True and repo["token"] == "hf_test"
    assert kind2 == "upload_folder" and upload["repo_id"] == "me/tiny-finesteer"
    assert upload["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "training_report.json"]


def test_push_adds_a_card_when_missing(adapter_copy, fake_hub):
    (adapter_copy / "README.md").unlink()
    push_adapter(adapter_copy, "me/tiny-finesteer")
    kind, card = fake_hub[-1]
    assert kind == "upload_file" and card["path_in_repo"] == "README.md"
    assert b"library_name: peft" in card["content"] and b"import fsteer_export" in card["content"]


@pytest.mark.parametrize("breaker", ["weights", "config"])
def test_push_validates_before_uploading(adapter_copy, fake_hub, breaker):
    (adapter_copy / ("adapter_model.safetensors" if breaker == "weights" else "adapter_config.json")).unlink()
    with pytest.raises(FSteerError):
        push_adapter(adapter_copy, "me/tiny-finesteer")
    assert fake_hub == []


def test_push_rejects_a_bad_repo_id(adapter_copy, fake_hub):
    with pytest.raises(FSteerError, match="owner/name"):
        push_adapter(adapter_copy, "no-owner")
    assert fake_hub == []


def test_push_turns_hub_errors_into_one_line(adapter_copy, monkeypatch):
    import huggingface_hub

    class Offline(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise OSError("Could not resolve host: huggingface.co")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(FSteerError, match="uploading to me/x failed: Could not resolve host"):
        push_adapter(adapter_copy, "me/x")
