"""Conv + BatchNorm folding: one formula for the fuse walker's ``fuse_bn`` pass and for the
branch merges inside layers and backbones (RepLKNet's large-kernel block)."""
from typing import Tuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ['bn_folded_kernel', 'is_batch_norm']


def is_batch_norm(module) -> bool:
    """Whether ``module`` is a BatchNorm with running statistics to fold: torch's (BN, SyncBN)
    or mmcv's ``SyncBatchNorm`` (``MMSyncBN``), which computes the same in eval mode."""
    bn_types = (_BatchNorm, ) + _mmcv_sync_bn()
    return (isinstance(module, bn_types) and module.track_running_stats
            and module.running_var is not None)


def _mmcv_sync_bn():
    try:
        from mmcv.ops import SyncBatchNorm
    except ImportError:  # mmcv without compiled ops
        return ()
    return (SyncBatchNorm, )


def bn_folded_kernel(conv: _ConvNd, bn: _BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of ``bn(conv(x))`` with eval statistics, in float64."""
    w = conv.weight
    std = (bn.running_var.to(torch.float64) + bn.eps).sqrt()
    gamma = bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    bias = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(std)
    return (w.to(torch.float64) * scale.reshape(-1, *([1] * (w.dim() - 1))),
            (bias - bn.running_mean.to(torch.float64)) * scale + beta)
