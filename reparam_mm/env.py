"""``python -m reparam_mm.env``: the versions to paste into a bug report."""
import platform
import sys


def collect_env():
    """Return an ordered dict of platform and package versions."""
    info = {'Python': sys.version.split()[0], 'Platform': platform.platform()}
    import torch
    info['PyTorch'] = torch.__version__
    info['CUDA available'] = torch.cuda.is_available()
    info['PyTorch CUDA'] = torch.version.cuda or 'none (CPU build)'
    if torch.cuda.is_available():
        info['GPUs'] = ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    try:
        import mmcv
        info['mmcv'] = mmcv.__version__
        try:
            from mmcv.ops import get_compiler_version, get_compiling_cuda_version
            info['mmcv ops'] = f'compiled ({get_compiler_version()}, CUDA ops: {get_compiling_cuda_version()})'
        except Exception as e:  # noqa: BLE001 - report, do not crash
            info['mmcv ops'] = f'NOT AVAILABLE ({e})'
    except ImportError:
        info['mmcv'] = 'not installed'
    for name in ('mmengine', 'mmseg', 'mmdet', 'numpy', 'pycocotools', 'setuptools', 'reparam_mm'):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, '__version__', 'installed')
        except Exception as e:  # noqa: BLE001
            info[name] = f'not importable ({type(e).__name__}: {e})'
    return info


def main():
    for key, value in collect_env().items():
        print(f'{key}: {value}')


if __name__ == '__main__':
    main()
