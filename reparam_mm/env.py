"""``python -m reparam_mm.env``: the versions to paste into a bug report.

:func:`collect_env` is also what every benchmark result records (``env`` in its JSON),
so its keys are stable names, not labels.
"""
import os
import platform
import sys


def cpu_model():
    """The CPU's model name (Linux ``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


#: environment variables that cap the instruction sets torch's CPU kernels use
ISA_CAPS = ('ONEDNN_MAX_CPU_ISA', 'DNNL_MAX_CPU_ISA', 'ATEN_CPU_CAPABILITY', 'MKL_ENABLE_INSTRUCTIONS')


def cpu_isa():
    """Whether oneDNN computes bf16 natively, and any cap on the ISA set in the environment: a
    CPU figure measured with bf16 in software, or under a cap, is not the CPU's own."""
    import torch
    from .layers.large_kernel import cpu_native_half
    info = dict(onednn_bf16='native' if cpu_native_half(torch.bfloat16) else 'software')
    caps = {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)}
    if caps:
        info['isa_caps'] = ', '.join(f'{k}={v}' for k, v in caps.items())
    return info


def collect_env(device=None):
    """Platform, CPU and package versions as a dict; with a CUDA ``device`` also its
    CUDA / cuDNN versions and GPU name (``cuda``, ``cudnn``, ``gpu``)."""
    import torch
    info = dict(python=platform.python_version(), platform=platform.platform(),
                torch=torch.__version__, torch_threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), cpu=cpu_model(),
                cuda_available=torch.cuda.is_available(),
                torch_cuda=torch.version.cuda or 'none (CPU build)')
    info.update(cpu_isa(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    if torch.cuda.is_available():
        info['gpus'] = ', '.join(torch.cuda.get_device_name(i)
                                 for i in range(torch.cuda.device_count()))
    try:
        import mmcv
        info['mmcv'] = mmcv.__version__
        try:
            from mmcv.ops import get_compiler_version, get_compiling_cuda_version
            info['mmcv_ops'] = (f'compiled ({get_compiler_version()}, CUDA ops: '
                                f'{get_compiling_cuda_version()})')
        except Exception as e:  # noqa: BLE001 - report, do not crash
            info['mmcv_ops'] = f'NOT AVAILABLE ({e})'
    except ImportError:
        info['mmcv'] = 'not installed'
    for name in ('mmengine', 'mmseg', 'mmdet', 'numpy', 'pycocotools', 'setuptools', 'reparam_mm'):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, '__version__', 'installed')
        except Exception as e:  # noqa: BLE001
            info[name] = f'not importable ({type(e).__name__}: {e})'
    if device is not None and torch.device(device).type == 'cuda':
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu=torch.cuda.get_device_name(device))
    return info


def main(argv=None):
    """Print :func:`collect_env` as ``key: value`` lines; a parser so that ``-h`` explains the
    tool and an unknown argument is refused instead of ignored."""
    import argparse
    argparse.ArgumentParser(
        description='Print the versions, CPU, threads and devices reparam_mm runs with, to paste '
                    'into a bug report (every benchmark JSON records the same, under env).'
    ).parse_args(argv)
    for key, value in collect_env().items():
        print(f'{key}: {value}')


if __name__ == '__main__':
    sys.exit(main())
