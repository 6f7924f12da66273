"""Heads and necks (registered in mmengine's root MODELS on import)."""
from .rpn_head import ConvCfgRPNHead

__all__ = ['ConvCfgRPNHead']
