"""Keep the memory PyTorch frees on the CPU inside the process, so the next step reuses it.

glibc's malloc serves every block above its mmap threshold (32 MB at most) with a fresh
``mmap`` and returns it to the kernel on ``free``. A CPU training step of a 512x512 segmentor
allocates gigabytes of such blocks (activations, their gradients, composed DO-Conv kernels),
and the kernel zero-fills every 4 KB page of them again on first touch: millions of page
faults and seconds of system time per step, spent on memory the process had a moment ago.
:func:`keep_freed_memory` tells glibc to carve large blocks from its heap and not to trim it,
so freed blocks are reused. The process's resident memory then stays near its peak.
"""
import ctypes
import functools
import os
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
#: ``REPARAM_MM_KEEP_FREED_MEMORY=0`` leaves glibc's defaults alone.
ENV = 'REPARAM_MM_KEEP_FREED_MEMORY'
_applied = False


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
        'fordblks', 'keepcost')]


@functools.lru_cache(maxsize=None)
def _glibc():
    """glibc as a ctypes library, or None (not Linux, or another C library such as musl)."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(top_pad_mb=256):
    """Serve large CPU blocks from malloc's heap and never trim it; True where applied.

    Applies to the whole process (and to processes it forks later, such as data loader
    workers). Does nothing, returning False, off glibc or when ``REPARAM_MM_KEEP_FREED_MEMORY``
    is ``0``. ``top_pad_mb`` is how much the heap grows by at a time beyond a request.
    """
    global _applied
    if os.environ.get(ENV, '1').strip() == '0':
        return False
    libc = _glibc()
    if libc is None:
        return False
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)
                    and libc.mallopt(M_TRIM_THRESHOLD, -1)  # -1: never trim (man mallopt)
                    and libc.mallopt(M_TOP_PAD, int(top_pad_mb) << 20))
    return _applied


def release_freed_memory():
    """Hand the free heap memory back to the kernel now (glibc ``malloc_trim(0)``); True if some
    was released. The process's resident size then counts only what it uses, e.g. before
    measuring a peak."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def kept_freed_memory():
    """True once :func:`keep_freed_memory` has applied in this process."""
    return _applied


def malloc_info():
    """glibc's ``mallinfo2`` as a dict of bytes (``arena``: heap, ``hblkhd``: mmapped blocks,
    ``uordblks``: in use, ``fordblks``: free), or None where it is not available (glibc < 2.33)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, 'mallinfo2'):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {name: int(getattr(info, name)) for name, _ in _MallInfo2._fields_}
