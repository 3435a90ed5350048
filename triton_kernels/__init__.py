"""Triton kernels of loram_fast (installed as ``loram_fast.triton_kernels``). Importing this package registers
the ``"triton"`` implementations with ``loram_fast.ops.dispatch``. Each op's torch reference lives in
``loram_fast/ops/<op>.py`` and is the test oracle (``tests/test_triton_kernels.py``)."""
from . import bases, matmul, moments, residual  # noqa: F401
