"""One error type for mistakes a user can fix.

The CLI renders :class:`FSteerError` as a single line (what is wrong, the value seen, how to
fix it) and exits non-zero; anything else is a bug and shows a traceback only with ``--debug``.
"""

from __future__ import annotations


class FSteerError(Exception):
    """A user-fixable problem: bad input file, wrong model for an adapter, bad option value."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem}" + (f" — fix: {self.fix}" if self.fix else "")


def warn(message: str) -> None:
    """A one-line ``warning: …`` on stderr for something fixed up on the user's behalf
    (duplicates dropped, over-long prompts truncated). Shown even with ``--quiet``."""
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_json_object(folder, name: str, *, what: str, missing: str, fix: str, redo: str) -> tuple:
    """``(path, dict)`` of the JSON object file ``folder/name``; one FSteerError line for a missing
    folder (``what`` names it), a missing file (``missing``), invalid JSON or a non-object (``redo``)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    if not folder.is_dir():
        raise FSteerError(f"{what} {folder} does not exist", fix)
    path = folder / name
    if not path.is_file():
        raise FSteerError(missing, fix)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FSteerError(f"{path} is not valid JSON ({exc})", redo) from exc
    if not isinstance(raw, dict):
        raise FSteerError(f"{path} does not hold a JSON object", redo)
    return path, raw
