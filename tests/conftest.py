import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (ROOT.parent / 'shared' / 'data').resolve()

# Two cores here: keep torch from oversubscribing when several tests build models.
os.environ.setdefault('OMP_NUM_THREADS', '2')


@pytest.fixture(scope='session')
def shared_data():
    """Path of the real datasets (../shared/data); tests needing it skip loudly without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real data folder {SHARED_DATA} not found (expected beside the project root)')
    return SHARED_DATA
