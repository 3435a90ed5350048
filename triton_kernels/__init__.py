"""Triton kernels of loram_fast (installed as ``loram_fast.triton_kernels``)."""
