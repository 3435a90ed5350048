"""The one way loram_fast patches peft: ``patch(owner, attr, make)`` replaces ``owner.attr`` by ``make(original)``
(idempotent, marked, the original kept as ``__wrapped_original__``); ``unpatch`` puts the original back."""
from __future__ import annotations

import functools
from typing import Callable

MARK = "_loram_fast_hook"  # the attribute that marks a patched function


def is_patched(owner, attr: str) -> bool:
    return getattr(getattr(owner, attr), MARK, False)


def patch(owner, attr: str, make: Callable[[Callable], Callable]) -> None:
    if is_patched(owner, attr):
        return
    original = getattr(owner, attr)
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, MARK, True)
    wrapper.__wrapped_original__ = original
    setattr(owner, attr, wrapper)


def unpatch(owner, attr: str) -> None:
    if is_patched(owner, attr):
        setattr(owner, attr, getattr(owner, attr).__wrapped_original__)
