"""tools/build_device_mmcv.sh refuses, in one sentence and before any download or build, to make
a GPU wheel with a Python or nvcc other than the GPU machine's."""
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.timeout(60)
SCRIPT = ROOT / 'tools' / 'build_device_mmcv.sh'
SYSTEM_PATH = '/usr/bin:/bin'


def _fake(folder, name, body):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f'#!/bin/sh\n{body}\n')
    path.chmod(0o755)
    return path


def _run(tmp_path, **env):
    base = {'HOME': str(tmp_path / 'home'), 'PATH': f'{tmp_path / "bin"}:{SYSTEM_PATH}',
            'DEVICE_WHEELS_DIR': str(tmp_path / 'whl'), 'DEVICE_VENV': str(tmp_path / 'venv')}
    proc = subprocess.run(['bash', str(SCRIPT)], env=dict(base, **env), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc.returncode, proc.stderr.strip()


@pytest.mark.skipif(shutil.which('python3.12', path=SYSTEM_PATH) is not None,
                    reason='this machine has a system python3.12')
def test_without_python_3_12_it_says_how_to_get_one(tmp_path):
    _fake(tmp_path / 'bin', 'python3', 'echo 3.11')
    rc, err = _run(tmp_path, DEVICE_PYTHON=str(tmp_path / 'bin' / 'python3'))
    assert rc == 1
    assert err == ('build_device_mmcv: no CPython 3.12 found (DEVICE_PYTHON, python3.12 on PATH, '
                   "pyenv): the GPU machine runs Python 3.12, so its mmcv wheel must be built with "
                   'one; install it (e.g. pyenv install 3.12) or set DEVICE_PYTHON, and run again.')
    assert not (tmp_path / 'venv').exists()


@pytest.mark.parametrize('release, says', [
    ('12.8', "build_device_mmcv: nvcc is CUDA 12.8, but the GPU machine's torch 2.11.0 is built for "
             'CUDA 13 and torch refuses to compile extensions across major versions; put a CUDA 13 '
             'nvcc first on PATH (or CUDA_HOME), and run again.'),
    # the right Python and nvcc: the carried wheels are still missing
    ('13.0', 'build_device_mmcv: no {whl}/: run `make device-wheels` first (the wheels the device '
             'call carries beside this one).'),
])
def test_it_checks_nvcc_and_the_carried_wheels_before_building(tmp_path, release, says):
    python = _fake(tmp_path / 'bin', 'python3.12', 'echo 3.12')
    _fake(tmp_path / 'bin', 'nvcc', f'echo "Cuda compilation tools, release {release}, V{release}.1"')
    rc, err = _run(tmp_path, DEVICE_PYTHON=str(python))
    assert (rc, err) == (1, says.format(whl=tmp_path / 'whl'))
    assert not (tmp_path / 'venv').exists()
