"""Pause Python's cyclic garbage collector while depprune works.

A trace, a plan or a cut allocates many small objects that stay alive until
it returns, and each full collection walks every object of the process
(torch, transformers, the model): about 0.2 s with a few hundred thousand of
them, paid again and again at no gain. Reference counting still frees
everything as usual; only cycles wait for the collector, which is re-enabled
on the way out.

>>> import gc
>>> with paused_gc():
...     gc.isenabled()
False
>>> gc.isenabled()
True
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector inside the block (a no-op if it is already off)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
