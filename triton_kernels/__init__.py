"""Triton kernels of loram_fast (installed as ``loram_fast.triton_kernels``): kernels and their launchers only.
Each op's module in ``loram_fast/ops/`` holds its torch reference and registers these launchers as its
``"triton"`` backend; the tests (``tests/test_triton_kernels.py``) compare them under ``TRITON_INTERPRET=1``."""
from . import bases, matmul, moments, norms, residual  # noqa: F401
