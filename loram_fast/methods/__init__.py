"""The math of each method, one file per family: plain torch plus the ops layer, no peft."""
from .common import LayerInit

__all__ = ["LayerInit"]
