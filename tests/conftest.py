import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (ROOT.parent / 'shared' / 'data').resolve()

# Two cores here: keep torch from oversubscribing when several tests build models.
os.environ.setdefault('OMP_NUM_THREADS', '2')
# The large-kernel dispatch times its candidates once per call signature and caches the choice
# in $REPARAM_MM_CACHE: each test session starts from an empty cache of its own, so a run never
# depends on what an earlier one measured (subprocesses such as torchrun inherit it).
os.environ['REPARAM_MM_CACHE'] = tempfile.mkdtemp(prefix='reparam_mm-test-cache-')
atexit.register(shutil.rmtree, os.environ['REPARAM_MM_CACHE'], True)


@pytest.fixture(scope='session')
def shared_data():
    """Path of the real datasets (../shared/data); tests needing it skip loudly without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real data folder {SHARED_DATA} not found (expected beside the project root)')
    return SHARED_DATA
