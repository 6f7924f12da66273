"""Heads and necks (registered in mmengine's root MODELS on import)."""
from .rpn_head import ConvCfgRPNHead
from .with_doconv import build_with_doconv  # registers WithDOConv

__all__ = ['ConvCfgRPNHead', 'build_with_doconv']
