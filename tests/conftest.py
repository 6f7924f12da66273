import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/ (the measurement code behind tools/benchmark.py) is not installed with the
# package; tests import it from the checkout, as the tools do.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
SHARED_DATA = (ROOT.parent / 'shared' / 'data').resolve()

# Two cores here: keep torch from oversubscribing when several tests build models.
os.environ.setdefault('OMP_NUM_THREADS', '2')
if 'PYTEST_XDIST_WORKER' in os.environ:
    # `make test` runs pytest-xdist workers (TEST_WORKERS): each takes its share of the cores,
    # one thread each on 2 cores. Tiny models gain nothing from a second thread, so two serial
    # workers use the cores where one two-threaded process waited on Python and process starts.
    # Set before torch is imported; subprocesses (torchrun, the tools) inherit it.
    os.environ['OMP_NUM_THREADS'] = str(max(
        1, (os.cpu_count() or 1) // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))))
# Triton kernels run under Triton's interpreter on CPU tensors unless the caller says otherwise
# (TRITON_INTERPRET=0 on a GPU machine tests them compiled). Set before anything imports the
# kernel module: triton reads it when it decorates the kernels.
os.environ.setdefault('TRITON_INTERPRET', '1')
# The large-kernel dispatch times its candidates once per call signature and caches the choice
# in $REPARAM_MM_CACHE: each test session starts from an empty cache of its own, so a run never
# depends on what an earlier one measured (subprocesses such as torchrun inherit it).
os.environ['REPARAM_MM_CACHE'] = tempfile.mkdtemp(prefix='reparam_mm-test-cache-')
atexit.register(shutil.rmtree, os.environ['REPARAM_MM_CACHE'], True)


def import_ecosystem(module):
    """``module`` (timm, mmpretrain: they import torchvision, which imports only beside a torch
    it was built for), or a skip that says why not; with ``REPARAM_MM_ECOSYSTEM=required``
    (``make test-ecosystem``, the GPU check) a failure instead. Tests import it as
    ``from conftest import import_ecosystem``."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision's operator errors
        why = f'{module} does not import on this stack ({type(e).__name__}: {e})'
        if os.environ.get('REPARAM_MM_ECOSYSTEM') == 'required':
            pytest.fail(f'{why}; REPARAM_MM_ECOSYSTEM=required says it must here.')
        pytest.skip(why)


@contextlib.contextmanager
def mmengine_log():
    """The records every mmengine logger (``print_log``, runners' loggers, including ones created
    inside) handles while inside. Tests read them here, not from capsys: mmengine's stream
    handler may still hold an earlier test's captured stdout. Tests import it as
    ``from conftest import mmengine_log``."""
    from mmengine.logging import MMLogger
    records, handle, own = [], MMLogger.handle, 'handle' in vars(MMLogger)

    def recorded(self, record):
        records.append(record)
        return handle(self, record)
    MMLogger.handle = recorded
    try:
        yield records
    finally:
        if own:
            MMLogger.handle = handle
        else:
            del MMLogger.handle


def load_tool(name):
    """``tools/<name>.py`` as a module, loaded once per session (the tools are scripts, not a
    package; each puts the checkout on ``sys.path`` itself). Tests import it as
    ``from conftest import load_tool``."""
    module_name = f'reparam_mm_tools.{name}'
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / 'tools' / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before running it: classes look their module up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]


@pytest.fixture(scope='session')
def shared_data():
    """Path of the real datasets (../shared/data); tests needing it skip loudly without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real data folder {SHARED_DATA} not found (expected beside the project root)')
    return SHARED_DATA


@pytest.fixture(autouse=True)
def mmengine_loggers_write_to_open_streams():
    """mmengine's loggers are process-wide and keep the stream they were made with: one made
    inside a test that captured output (capsys) holds that test's stream, closed once it ended,
    and a later test's log line through it ends in '--- Logging error ---' on stderr. Such a
    handler writes to this test's stdout instead."""
    if 'mmengine.logging' in sys.modules:
        from mmengine.logging import MMLogger
        for logger in list(MMLogger._instance_dict.values()):
            for handler in logger.handlers:
                stream = getattr(handler, 'stream', None)
                if type(handler) is logging.StreamHandler and getattr(stream, 'closed', False):
                    handler.stream = sys.stdout  # setStream would flush the closed one
    yield


@pytest.fixture(autouse=True)
def environment_dispatch_mode():
    """A config's ``large_dw_dispatch`` sets the mode for the process (tools/test.py's path keeps
    it): after each test the environment decides again, so no test sees another's mode."""
    yield
    from reparam_mm.layers.large_kernel import set_dispatch_mode
    set_dispatch_mode(None)


@pytest.fixture(autouse=True)
def native_half_precision(monkeypatch):
    """The large-kernel fixed rules as on a CPU with native bf16 / fp16 (AVX512-BF16, AMX), so
    that tests of those rules pass on an AVX2-only CPU too, where half precision takes the FFT
    (test_large_kernel.py tests that branch by setting it False)."""
    from reparam_mm.layers import large_kernel
    monkeypatch.setattr(large_kernel, 'cpu_native_half', lambda dtype: True)


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """A fresh large-kernel tuner with its own cache file and injected timings
    (``tuner.times[name]``: seconds per candidate or layout, 1.0 where not given); every
    candidate still runs once on the call's shapes, and ``tuner.measured`` lists them."""
    from reparam_mm.layers import large_kernel
    monkeypatch.setenv('REPARAM_MM_CACHE', str(tmp_path))
    fresh = large_kernel.LargeDWTuner()
    fresh.times, fresh.measured = {}, []

    def time_candidates(runs, **options):
        times, errors = {}, {}
        for name, run in runs.items():
            try:
                run()  # the candidate really runs on the call's shapes
            except RuntimeError as e:
                errors[name] = str(e)
                continue
            fresh.measured.append(name)
            times[name] = fresh.times.get(name, 1.0)
        return times, errors

    fresh.time_candidates = time_candidates
    monkeypatch.setattr(large_kernel, '_cpu_seconds', lambda: None)  # a quiet machine
    monkeypatch.setattr(large_kernel, 'TUNER', fresh)
    return fresh
