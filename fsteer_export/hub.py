"""Pushing an adapter folder to the Hugging Face Hub (``fsteer push``).

The folder is validated with the same checks as loading (config fields, safetensors weights, shapes)
before anything is uploaded: a broken adapter on the Hub is worse than none. Pickle-based weight files
and hidden/temporary files are never uploaded.
"""

from __future__ import annotations

from pathlib import Path

from .errors import FSteerError

# Never uploaded: pickle-based weights (we never load them either) and atomic-save leftovers.
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", ".*", "**/.*", "__pycache__/*"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_transfer_error(exc: BaseException) -> bool:
    """Hub/HTTP/network failures (user-fixable), as opposed to bugs that should show a traceback."""
    if isinstance(exc, (OSError, ValueError)):  # HfHubHTTPError is an OSError
        return True
    return type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def push_adapter(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Validate ``folder`` and upload it to the model repo ``repo_id`` (created if needed); return its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError

    from .adapter import read_config, read_weights
    from .card import model_card

    folder = Path(folder)
    cfg = read_config(folder)
    read_weights(folder, cfg)
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise FSteerError(f"invalid Hub repo id {repo_id!r}", "use the form owner/name, e.g. me/smollm2-finesteer-safety")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          ignore_patterns=list(IGNORE_PATTERNS),  # upload_folder extends it in place
                          commit_message=f"Upload FineSteer adapter ({cfg.task}, layer {cfg.layer})")
        if not (folder / "README.md").is_file():  # a Hub adapter needs its card: loading snippet + metadata
            api.upload_file(path_or_fileobj=model_card(cfg).encode("utf-8"), path_in_repo="README.md",
                            repo_id=repo_id, repo_type="model", commit_message="Add FineSteer model card")
    except HFValidationError as exc:
        raise FSteerError(f"invalid Hub repo id {repo_id!r}: {_first_line(exc)}", "use the form owner/name") from exc
    except Exception as exc:
        if not _is_transfer_error(exc):
            raise
        raise FSteerError(f"uploading to {repo_id} failed: {_first_line(exc)}",
                          "check the network, `huggingface-cli login` or --token, and write access to the repo") from exc
    return str(url)
