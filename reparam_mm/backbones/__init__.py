"""Backbones (registered in mmengine's root MODELS on import)."""
from .replknet import RepLKNet

__all__ = ['RepLKNet']
