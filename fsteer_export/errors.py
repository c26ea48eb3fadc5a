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
