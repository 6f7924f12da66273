"""tools/setup_env.py: which mmcv ops a torch gets, and one sentence where a build cannot start."""
import importlib.util

import pytest

from conftest import ROOT

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope='module')
def setup_env():
    spec = importlib.util.spec_from_file_location('setup_env', ROOT / 'tools' / 'setup_env.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_cpu_torch_gets_cpu_ops(setup_env):
    assert setup_env.mmcv_ops('2.13.0+cpu', 'cpu', None, {}) == ('cpu', {'FORCE_CUDA': '0'})


def test_a_cuda_torch_gets_cuda_ops_for_the_visible_gpus_named_in_the_cache_key(setup_env):
    assert setup_env.mmcv_ops('2.11.0+cu130', '13.0', '9.0', {}) == (
        'cuda13.0_sm90', {'FORCE_CUDA': '1', 'TORCH_CUDA_ARCH_LIST': '9.0'})
    # the user's list wins, and a wheel for other GPUs has another key
    suffix, env = setup_env.mmcv_ops('2.11.0+cu130', '13.0', '9.0',
                                     {'TORCH_CUDA_ARCH_LIST': '8.0;9.0+PTX'})
    assert suffix == 'cuda13.0_sm80-90ptx' and env['TORCH_CUDA_ARCH_LIST'] == '8.0;9.0+PTX'
    assert setup_env.mmcv_ops('2.11.0+cu130', '13.0', None, {'TORCH_CUDA_ARCH_LIST': '8.0 8.6'})[0] \
        == 'cuda13.0_sm80-86'


def test_no_gpu_and_no_arch_list_says_what_to_set(setup_env):
    with pytest.raises(setup_env.SetupError, match=r'torch 2.11.0\+cu130 is a CUDA 13.0 build but '
                       r'no GPU is visible and TORCH_CUDA_ARCH_LIST is not set.*FORCE_CUDA=0'):
        setup_env.mmcv_ops('2.11.0+cu130', '13.0', None, {})


def test_force_cuda_0_builds_cpu_ops_with_a_cuda_torch_under_their_own_key(setup_env):
    assert setup_env.mmcv_ops('2.11.0+cu130', '13.0', '9.0', {'FORCE_CUDA': '0'}) == (
        'cuda13.0_cpu-ops', {'FORCE_CUDA': '0', 'CUDA_VISIBLE_DEVICES': ''})


def test_a_cuda_build_without_nvcc_stops_before_building(setup_env, monkeypatch, tmp_path):
    monkeypatch.setattr(setup_env, 'cuda_home', lambda: '')
    monkeypatch.setattr(setup_env.shutil, 'which', lambda name: f'/usr/bin/{name}')  # a C++ compiler
    monkeypatch.setattr(setup_env, 'CACHE', tmp_path / 'wheels')
    monkeypatch.setattr(setup_env, 'run', lambda *a, **k: pytest.fail('the build was started'))
    with pytest.raises(setup_env.SetupError, match=r"no CUDA compiler \(nvcc\) found for mmcv's "
                       r'CUDA ops: install the CUDA 13.0 toolkit and set CUDA_HOME'):
        setup_env.build_mmcv_wheel(tmp_path / 'key', '13.0',
                                   {'FORCE_CUDA': '1', 'TORCH_CUDA_ARCH_LIST': '9.0'})
    assert not (tmp_path / 'wheels').exists()
