#!/usr/bin/env python3
"""Set up ``.venv`` with the OpenMMLab stack reparam_mm runs on.

Run with any Python 3.9-3.12 (``make test`` / ``make demo`` call it). Steps:

1. create ``.venv`` if missing;
2. install torch unless the venv already has one (a CUDA torch the user put
   there is kept: the set-up never forces the CPU build), then pin exactly that
   torch and the setuptools range in a constraints file used by every later
   pip call, so no dependency can swap torch under the compiled mmcv;
3. install mmcv 2.1.0 with compiled ops from a wheel cache keyed by mmcv,
   torch, Python and CUDA versions and the GPU architectures compiled for
   (:func:`mmcv_ops`), building the wheel from the sdist once
   (about 13 minutes on 2 cores) and publishing it atomically;
4. install requirements.txt and reparam_mm (editable);
5. check that ``mmcv.ops`` works and mmseg / mmdet / reparam_mm import.

Running it twice is harmless: a stamp of the inputs skips pip when nothing
changed, and the import check still runs.

Environment knobs: ``TORCH_SPEC`` (default ``torch==2.13.0``) and
``TORCH_INDEX_URL`` choose the torch to install into a new venv;
``REPARAM_MM_VENV`` puts the venv elsewhere (tools/build_device_mmcv.sh makes
the GPU machine's Python and torch there);
``REPARAM_MM_CACHE`` moves the wheel cache (default ``~/.cache/reparam_mm``);
``MAX_JOBS`` sets the build parallelism. With a CUDA torch mmcv gets CUDA ops for
the visible GPUs' architectures, or ``TORCH_CUDA_ARCH_LIST``'s where none is
visible (a login node); ``FORCE_CUDA=0`` builds CPU ops only.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get('REPARAM_MM_VENV', ROOT / '.venv')).absolute()
VPY = VENV / 'bin' / 'python'
CONSTRAINTS = VENV / 'reparam_mm-constraints.txt'
STAMP = VENV / '.reparam_mm-setup-stamp'
MMCV_VERSION = '2.1.0'
SETUPTOOLS_RANGE = 'setuptools>=77.0.3,<81'
SUPPORTED_PY = ((3, 9), (3, 12))
CACHE = Path(os.environ.get('REPARAM_MM_CACHE',
                            Path.home() / '.cache' / 'reparam_mm')) / 'wheels'


class SetupError(RuntimeError):
    pass


def log(msg):
    print(f'[setup] {msg}', flush=True)


def run(*cmd, env=None, quiet=False):
    kwargs = dict(env=env)
    if quiet:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run([str(c) for c in cmd], **kwargs)
    if proc.returncode != 0:
        tail = proc.stdout[-4000:] if quiet and proc.stdout else ''
        raise SetupError(f'command failed ({proc.returncode}): {" ".join(map(str, cmd))}\n{tail}')
    return proc


def venv_python(code):
    """Run ``code`` in the venv; return stdout or None if it raised."""
    proc = subprocess.run([str(VPY), '-c', code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def pip(*args, constrained=True, quiet=True):
    cmd = [VPY, '-m', 'pip', 'install', '--disable-pip-version-check']
    if quiet:
        cmd.append('-q')
    if constrained:
        cmd += ['-c', CONSTRAINTS]
    run(*cmd, *args, quiet=quiet)


def check_python():
    v = sys.version_info[:2]
    lo, hi = SUPPORTED_PY
    if not lo <= v <= hi:
        raise SetupError(
            f'Python {v[0]}.{v[1]} is not supported: mmcv {MMCV_VERSION} / mmseg / mmdet need '
            f'Python {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}; run `make test PY=python3.11` with a supported one.')


def ensure_venv():
    if VPY.exists():
        return
    log(f'creating {VENV}')
    try:
        run(sys.executable, '-m', 'venv', VENV, quiet=True)
    except SetupError as e:
        raise SetupError('could not create the virtual environment; install the venv module '
                         f'(Debian: apt-get install python3-venv).\n{e}') from None


def installed_torch_version():
    # Package metadata, not `import torch`: a no-op set-up should take seconds.
    return venv_python('from importlib.metadata import version; print(version("torch"))')


def ensure_torch():
    version = installed_torch_version()
    if version is None:
        spec = os.environ.get('TORCH_SPEC', 'torch==2.13.0')
        log(f'installing {spec}')
        extra = ['--index-url', os.environ['TORCH_INDEX_URL']] if os.environ.get('TORCH_INDEX_URL') else []
        pip(spec, *extra, constrained=False)
        if venv_python('import torch; print(torch.__version__)') is None:  # must really import
            raise SetupError(f'torch was installed ({spec}) but does not import in {VENV}.')
        # The pin is the distribution's version, which pip compares: PyPI's CUDA torch says
        # 2.11.0 there and 2.11.0+cu130 in torch.__version__, and a pin of the latter matched
        # nothing, so every later install needing torch failed as a conflict.
        version = installed_torch_version()
    else:
        log(f'keeping the installed torch {version}')
    CONSTRAINTS.write_text(f'torch=={version}\n{SETUPTOOLS_RANGE}\n')
    return version


def torch_info():
    out = venv_python('import torch, sys; '
                      'print(torch.__version__, torch.version.cuda or "cpu", '
                      '"%d.%d" % sys.version_info[:2], int(torch.cuda.is_available()))')
    torch_v, cuda, py, has_gpu = out.split()
    return torch_v, cuda, py, has_gpu == '1'


def mmcv_ok():
    return venv_python('import mmcv; from mmcv.ops import nms, RoIAlign; print(mmcv.__version__)') \
        == MMCV_VERSION


def cuda_arch_list():
    out = venv_python('import torch; print(";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) '
                      'for i in range(torch.cuda.device_count())})))')
    return out or None


def cuda_home():
    return venv_python('from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")')


# torch's ATen/cuda headers include these. A CUDA toolkit of only nvcc and the runtime lacks
# them, while a CUDA torch from PyPI brings them in its nvidia-* packages.
CUDA_LIBRARY_HEADERS = ('cublas_v2.h', 'cublasLt.h', 'cusparse.h', 'cusolverDn.h')
DEFAULT_CUDA_HOME = '/usr/local/cuda'
CUDA_SEARCH_CODE = r"""
import json, os, shutil
from torch.utils.cpp_extension import CUDA_HOME
dirs = []
try:
    import nvidia  # the nvidia-* wheels a CUDA torch from PyPI depends on
    for root in nvidia.__path__:
        dirs += sorted(os.path.join(root, n, 'include') for n in os.listdir(root))
        dirs.append(os.path.join(root, 'include'))
except ImportError:
    pass
nvcc = shutil.which('nvcc')
print(json.dumps({'torch_cuda_home': CUDA_HOME or '', 'nvcc': os.path.realpath(nvcc) if nvcc else '',
                  'dirs': [d for d in dirs if os.path.isdir(d)]}))
"""


def cuda_toolkit(torch_cuda_home, nvcc, environ):
    """The CUDA toolkit to compile with: ``CUDA_HOME`` if set; else torch's guess if it holds the
    runtime headers; else /usr/local/cuda or the folder above nvcc's. torch guesses the folder
    above the first nvcc on PATH, which for a wrapper script such as /usr/local/bin/nvcc is
    /usr/local, where no CUDA header is."""
    if environ.get('CUDA_HOME'):
        candidates = [environ['CUDA_HOME']]
    else:
        candidates = [torch_cuda_home, DEFAULT_CUDA_HOME, str(Path(nvcc).parent.parent) if nvcc else '']
    for home in candidates:
        if home and (Path(home) / 'include' / 'cuda_runtime.h').exists() \
                and (Path(home) / 'bin' / 'nvcc').exists():
            return home
    shown = ', '.join(dict.fromkeys(c for c in candidates if c)) or 'none found'
    raise SetupError(f"no CUDA toolkit with nvcc and cuda_runtime.h found to compile mmcv's CUDA "
                     f'ops ({shown}): install the CUDA toolkit and set CUDA_HOME to it, and run again.')


def cuda_header_dirs(cuda_home, search_dirs):
    """Folders to put on the compilers' search path (``CPATH``) so that torch's CUDA headers
    find the library headers that ``cuda_home``'s own include folder lacks."""
    have = Path(cuda_home) / 'include'
    dirs = []
    for header in CUDA_LIBRARY_HEADERS:
        if (have / header).exists():
            continue
        found = next((d for d in search_dirs if (Path(d) / header).exists()), None)
        if found is None:
            raise SetupError(
                f"{header}, which torch's CUDA headers include, is neither in {have} nor in "
                "torch's nvidia-* packages: install the CUDA toolkit's math libraries (cuBLAS, "
                'cuSPARSE, cuSOLVER) or a full toolkit and point CUDA_HOME at it, and run again.')
        if found not in dirs:
            dirs.append(found)
    return dirs


def cuda_build_env(python, environ):
    """``CUDA_HOME`` and ``CPATH`` for compiling mmcv's CUDA ops against ``python``'s torch."""
    proc = subprocess.run([str(python), '-c', CUDA_SEARCH_CODE], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SetupError(f'{python} cannot import torch to find its CUDA headers:\n'
                         + proc.stderr[-2000:])
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    home = cuda_toolkit(found['torch_cuda_home'], found['nvcc'], environ)
    dirs = cuda_header_dirs(home, found['dirs'])
    env = {'CUDA_HOME': home}
    cpath = os.pathsep.join(dirs + [p for p in [environ.get('CPATH', '')] if p])
    if cpath:
        env['CPATH'] = cpath
    return env


def mmcv_ops(torch_v, cuda, gpu_archs, environ):
    """``(wheel-cache suffix, build environment)``: which ops mmcv is compiled with.

    A CPU torch gets CPU ops; a CUDA torch CUDA ops for ``gpu_archs`` (the visible GPUs') or
    ``TORCH_CUDA_ARCH_LIST``, which the suffix names, so a cache shared by machines with other
    GPUs never hands over a wheel built for another architecture; ``FORCE_CUDA=0`` asks for CPU
    ops with a CUDA torch (a machine that only tests on CPU).
    """
    if cuda == 'cpu':
        return 'cpu', {'FORCE_CUDA': '0'}
    if environ.get('FORCE_CUDA') == '0':
        # mmcv compiles CUDA ops whenever it sees a GPU, so it is shown none
        return f'cuda{cuda}_cpu-ops', {'FORCE_CUDA': '0', 'CUDA_VISIBLE_DEVICES': ''}
    arch = environ.get('TORCH_CUDA_ARCH_LIST') or gpu_archs
    if not arch:
        raise SetupError(
            f'torch {torch_v} is a CUDA {cuda} build but no GPU is visible and '
            "TORCH_CUDA_ARCH_LIST is not set, so mmcv's CUDA ops have no architecture to be "
            "compiled for: set TORCH_CUDA_ARCH_LIST to your GPUs' compute capability (e.g. 9.0 "
            'for H100 / H200, 8.0 for A100) or FORCE_CUDA=0 for CPU ops only, and run again.')
    archs = [a for a in arch.replace(' ', ';').split(';') if a]
    tag = '-'.join(a.replace('.', '').replace('+PTX', 'ptx') for a in archs)
    return f'cuda{cuda}_sm{tag}', {'FORCE_CUDA': '1', 'TORCH_CUDA_ARCH_LIST': arch}


# gcc / ld (file:line:col: error), nvcc (file(line): error), ninja's FAILED: lines
COMPILER_ERROR = re.compile(r'^\s*FAILED:|(:\d+(:\d+)?|\(\d+\)): (fatal )?error|collect2: error|'
                            r'undefined reference to')


def build_failure(output, build_log):
    """The message of a failed mmcv build: the compiler's own error lines, not pip's traceback."""
    errors = [line.strip() for line in output.splitlines() if COMPILER_ERROR.search(line)]
    shown = '\n  '.join(dict.fromkeys(errors)) if errors else '\n'.join(output.splitlines()[-15:])
    return (f'building mmcv {MMCV_VERSION} failed; the compiler said:\n  {shown[:3000]}\n'
            f'The whole build output is in {build_log}.')


def build_mmcv_wheel(key_dir, cuda, build_env):
    """Build the mmcv wheel into a private temp dir, then publish it with one rename."""
    if not (shutil.which('c++') or shutil.which('g++')):
        raise SetupError('no C++ compiler found: mmcv must be compiled; install one '
                         '(Debian/Ubuntu: apt-get install g++) and run again.')
    if build_env['FORCE_CUDA'] == '1' and not cuda_home():
        raise SetupError(f"no CUDA compiler (nvcc) found for mmcv's CUDA ops: install the CUDA "
                         f'{cuda} toolkit and set CUDA_HOME, or set FORCE_CUDA=0 for CPU ops '
                         'only, and run again.')
    env = dict(os.environ, **build_env)
    if build_env['FORCE_CUDA'] == '1':
        env.update(cuda_build_env(VPY, os.environ))
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{key_dir.name}.partial-', dir=CACHE))
    env.setdefault('MAX_JOBS', str(os.cpu_count() or 2))
    log(f'building mmcv {MMCV_VERSION} from source for {key_dir.name} '
        f'(MAX_JOBS={env["MAX_JOBS"]}; about 13 minutes on 2 cores) ...')
    t0 = time.time()
    try:
        # --no-cache-dir: pip's own wheel cache is keyed by the sdist only, so it would hand back
        # a wheel compiled against another torch (or without CUDA ops).
        proc = subprocess.run([str(VPY), '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                               '--no-cache-dir', '-w', str(tmp), f'mmcv=={MMCV_VERSION}'],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            build_log = CACHE / f'{key_dir.name}.build.log'
            build_log.write_text(proc.stdout)
            raise SetupError(build_failure(proc.stdout, build_log))
        wheels = list(tmp.glob('mmcv-*.whl'))
        if len(wheels) != 1:
            raise SetupError(f'mmcv build produced {len(wheels)} wheels in {tmp}')
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, key_dir)  # atomic: the key dir exists only when complete
        except OSError:
            if not any(key_dir.glob('mmcv-*.whl')):  # someone else published meanwhile is fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f'built mmcv in {time.time() - t0:.0f} s -> {key_dir}')


def mmcv_cache_dir():
    """``(folder, CUDA version, build environment)`` of the venv torch's mmcv wheel in the cache."""
    torch_v, cuda, py, has_gpu = torch_info()
    suffix, build_env = mmcv_ops(torch_v, cuda, cuda_arch_list() if has_gpu else None, os.environ)
    return CACHE / f'mmcv-{MMCV_VERSION}_torch-{torch_v}_py{py}_{suffix}', cuda, build_env


def ensure_mmcv():
    if mmcv_ok():
        log(f'mmcv {MMCV_VERSION} with ops already installed')
        return
    key_dir, cuda, build_env = mmcv_cache_dir()
    pip('ninja', 'wheel', SETUPTOOLS_RANGE)
    wheels = sorted(key_dir.glob('mmcv-*.whl'))
    if wheels:
        log(f'using cached mmcv wheel {wheels[0]}')
    else:
        build_mmcv_wheel(key_dir, cuda, build_env)
        wheels = sorted(key_dir.glob('mmcv-*.whl'))
    # mmcv's own requirements (addict, yapf, opencv ...) come with the wheel's metadata.
    pip('--force-reinstall', '--no-deps', wheels[0])
    pip(wheels[0])
    if not mmcv_ok():
        err = subprocess.run([str(VPY), '-c', 'from mmcv.ops import nms, RoIAlign'],
                             stderr=subprocess.PIPE, text=True).stderr.strip().splitlines()
        raise SetupError(
            f'mmcv {MMCV_VERSION} is installed but its compiled ops do not load '
            f'({err[-1] if err else "unknown error"}); delete {key_dir} and run again so it is rebuilt '
            'with torch visible.')


def inputs_digest():
    h = hashlib.sha256()
    for name in ('requirements.txt', 'pyproject.toml', 'tools/setup_env.py'):
        h.update((ROOT / name).read_bytes())
    h.update(CONSTRAINTS.read_bytes())
    return h.hexdigest()


def ensure_requirements():
    digest = inputs_digest()
    if STAMP.exists() and STAMP.read_text() == digest:
        log('requirements unchanged since the last set-up')
        return
    log('installing requirements.txt and reparam_mm')
    pip('-r', ROOT / 'requirements.txt')
    pip('--no-deps', '--no-build-isolation', '-e', ROOT)
    STAMP.write_text(digest)


def verify():
    code = ('import reparam_mm, mmseg, mmdet, mmengine, mmcv, torch; '
            'from mmcv.ops import nms, RoIAlign; import pkg_resources; '
            'print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, '
            'mmseg {mmseg.__version__}, mmdet {mmdet.__version__}")')
    proc = subprocess.run([str(VPY), '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        if STAMP.exists():
            STAMP.unlink()  # force a reinstall next time
        raise SetupError('the stack does not import:\n' + proc.stderr[-3000:])
    log('ready: ' + proc.stdout.strip())


def print_cuda_build_env(argv):
    """``--cuda-build-env [PYTHON]`` (tools/device_check.sh's own mmcv build): CUDA_HOME=... and
    CPATH=..., one per line."""
    for key, value in cuda_build_env(argv[0] if argv else sys.executable, os.environ).items():
        print(f'{key}={value}')


def print_mmcv_wheel(argv):
    """``--mmcv-wheel`` (tools/build_device_mmcv.sh): the cached wheel the set-up installed."""
    if not VPY.exists():
        raise SetupError(f'no venv at {VENV}; run the set-up first.')
    wheels = sorted(mmcv_cache_dir()[0].glob('mmcv-*.whl'))
    if not wheels:
        raise SetupError(f"no mmcv wheel cached for {VENV}'s torch; run the set-up first.")
    print(wheels[0])


QUERIES = {'--cuda-build-env': print_cuda_build_env, '--mmcv-wheel': print_mmcv_wheel}


USAGE = __doc__.split('Environment knobs')[0].rstrip() + """

Usage:
  tools/setup_env.py                            the set-up above
  tools/setup_env.py --cuda-build-env [PYTHON]  print CUDA_HOME=... and CPATH=... to build mmcv
                                                against PYTHON's torch (tools/device_check.sh)
  tools/setup_env.py --mmcv-wheel               print the cached mmcv wheel the set-up installed
                                                (tools/build_device_mmcv.sh)

Environment knobs""" + __doc__.split('Environment knobs')[1]


def main(argv):
    if argv[:1] and argv[0] in ('-h', '--help'):
        print(USAGE)
        return 0
    if argv and argv[0] not in QUERIES:
        print(f'[setup] ERROR: unknown argument {argv[0]!r}: the set-up takes no arguments (its '
              f'options are environment variables), the queries are {", ".join(QUERIES)}; '
              'see tools/setup_env.py --help.', file=sys.stderr)
        return 2
    if argv[:1] and argv[0] in QUERIES:
        try:
            QUERIES[argv[0]](argv[1:])
        except SetupError as e:
            print(f'[setup] ERROR: {e}', file=sys.stderr)
            return 1
        return 0
    t0 = time.time()
    try:
        check_python()
        ensure_venv()
        ensure_torch()
        ensure_mmcv()
        ensure_requirements()
        verify()
    except SetupError as e:
        print(f'[setup] ERROR: {e}', file=sys.stderr)
        return 1
    log(f'done in {time.time() - t0:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
