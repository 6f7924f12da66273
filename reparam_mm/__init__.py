"""reparam_mm: DO-Conv layers and RepLKNet / UniRepLKNet backbones for OpenMMLab 2.x.

Importing the package registers its layers, backbones, heads and hooks in
mmengine's root registries, so configs use them under the mmseg and mmdet
default scopes alike (``custom_imports=dict(imports=['reparam_mm'])``).
"""
from . import compat  # noqa: F401  (must run first: checkpoint loading fixes)
from .fuse import fuse, fuse_with_report  # noqa: E402
from .hooks import FusedEvalHook  # noqa: E402
from .visualization import SavePredictionsHook  # noqa: E402
from .layers import DOConv2d  # noqa: E402
from .backbones import RepLKNet, UniRepLKNet  # noqa: E402
from .models import ConvCfgRPNHead  # noqa: E402
from .datasets import DemoADEDataset  # noqa: E402
from .optim import UniRepLKNetLayerDecayOptimizerConstructor  # noqa: E402
from .amp import CPUAmpOptimWrapper  # noqa: E402

__version__ = '0.1.0'

__all__ = ['__version__', 'fuse', 'fuse_with_report', 'FusedEvalHook', 'DOConv2d',
           'SavePredictionsHook', 'DemoADEDataset', 'RepLKNet', 'UniRepLKNet', 'ConvCfgRPNHead',
           'UniRepLKNetLayerDecayOptimizerConstructor', 'CPUAmpOptimWrapper']
