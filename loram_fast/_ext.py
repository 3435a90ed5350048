"""Loading of the compiled extension ``loram_fast._C`` (csrc/). Filled in by the kernels work."""
from __future__ import annotations


def status(cuda: bool = False) -> bool | str:
    return "the compiled extension is not built"
