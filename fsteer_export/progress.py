"""Progress display shared by every long stage (extraction, training, evaluation, export)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def quiet() -> bool:
    return os.environ.get("FSTEER_QUIET", "") not in ("", "0")


def track(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar on stderr (disabled with FSTEER_QUIET=1)."""
    return iter(tqdm(items, desc=desc, total=total, disable=quiet(), file=sys.stderr,
                     leave=False, dynamic_ncols=True))


@contextlib.contextmanager
def status(message: str):
    """One line before and after a step without an item count, with its duration."""
    start = time.perf_counter()
    if not quiet():
        print(f"… {message}", file=sys.stderr, flush=True)
    yield
    if not quiet():
        print(f"✓ {message} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
