"""loram_fast: fast, exact LoRA initialisations for Hugging Face peft.

>>> import loram_fast
>>> loram_fast.init_model(peft_model, method="loram")
>>> # or, with stock peft: LoraConfig(..., init_lora_weights="loram")
"""
import logging as _logging

from .api import init_model
from .intruders import reduce_intruder_dimension
from .methods.loftq import loftq_factors
from .ops.topsvd import bottom_svd, top_svd
from .ops import (backends, cholesky_qr, dst_basis, loram_residual_, lowrank_update_, matmul_f32, randomized_svd,
                  weight_moments)
from .registry import Method, available_methods, get_method, register

__version__ = "0.1.0"

__all__ = [
    "init_model", "reduce_intruder_dimension", "randomized_svd", "cholesky_qr", "available_methods", "get_method", "register", "Method", "backends",
    "dst_basis", "weight_moments", "lowrank_update_", "loram_residual_", "matmul_f32", "loftq_factors", "top_svd",
    "bottom_svd",
]

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

try:
    from . import peft_hook as _peft_hook

    _peft_hook.install()
except ImportError:  # pragma: no cover - peft is a dependency; keep the math usable without it
    _logging.getLogger(__name__).warning("loram_fast: peft is not importable; the LoraConfig hook is not installed")
