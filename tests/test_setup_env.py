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


def _headers(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text('#pragma once\n')
    return str(folder)


def test_a_full_toolkit_needs_no_extra_header_folders(setup_env, tmp_path):
    home = tmp_path / 'cuda'
    _headers(home / 'include', setup_env.CUDA_LIBRARY_HEADERS)
    pip_dir = _headers(tmp_path / 'nvidia' / 'cu13' / 'include', setup_env.CUDA_LIBRARY_HEADERS)
    assert setup_env.cuda_header_dirs(home, [pip_dir]) == []


def test_a_toolkit_without_math_headers_takes_them_from_torchs_nvidia_packages(setup_env, tmp_path):
    # the shape of this machine: nvcc and cudart only, and torch 2.11's nvidia/cu13/include;
    # a CUDA 12 torch spreads them over one package per library
    home = tmp_path / 'cuda'
    _headers(home / 'include', ['cuda_runtime.h', 'cublasLt.h'])
    empty = _headers(tmp_path / 'nvidia' / 'cudnn' / 'include', ['cudnn.h'])
    cu13 = _headers(tmp_path / 'nvidia' / 'cu13' / 'include', setup_env.CUDA_LIBRARY_HEADERS)
    assert setup_env.cuda_header_dirs(home, [empty, cu13]) == [cu13]
    cublas = _headers(tmp_path / 'nvidia' / 'cublas' / 'include', ['cublas_v2.h'])
    cusparse = _headers(tmp_path / 'nvidia' / 'cusparse' / 'include', ['cusparse.h'])
    cusolver = _headers(tmp_path / 'nvidia' / 'cusolver' / 'include', ['cusolverDn.h'])
    assert setup_env.cuda_header_dirs(home, [cublas, cusolver, cusparse]) == [cublas, cusparse, cusolver]


def test_a_missing_math_header_is_named_before_building(setup_env, tmp_path):
    home = tmp_path / 'cuda'
    _headers(home / 'include', ['cuda_runtime.h', 'cublas_v2.h', 'cublasLt.h', 'cusolverDn.h'])
    with pytest.raises(setup_env.SetupError, match=r"cusparse.h, which torch's CUDA headers include, "
                       r'is neither in .*cuda/include nor in torch.s nvidia-\* packages'):
        setup_env.cuda_header_dirs(home, [])


def test_a_failed_build_shows_the_compilers_errors_and_keeps_the_whole_output(
        setup_env, monkeypatch, tmp_path):
    output = '\n'.join([  # the shape of pip's output when the build of this machine failed
        '  error: subprocess-exited-with-error',
        '      calls to avoid build errors in the future.',
        '      [36/136] /usr/local/cuda/bin/nvcc -c active_rotated_filter_cuda.cu',
        '      FAILED: [code=1] build/active_rotated_filter_cuda.o',
        '      torch/include/ATen/cuda/CUDAContextLight.h:10:10: fatal error: cusparse.h: No such file or directory',
        '      compilation terminated.',
        '      nms_cuda.cu(12): error: identifier "THCudaCheck" is undefined',
        '  Traceback (most recent call last):',
        '      raise RuntimeError(message) from e',
        '  RuntimeError: Error compiling objects for extension',
        '  note: This error originates from a subprocess, and is likely not a problem with pip.',
        '  ERROR: Failed building wheel for mmcv'])

    class Failed:
        returncode, stdout = 1, output

    monkeypatch.setattr(setup_env.shutil, 'which', lambda name: f'/usr/bin/{name}')
    monkeypatch.setattr(setup_env, 'CACHE', tmp_path / 'wheels')
    monkeypatch.setattr(setup_env.subprocess, 'run', lambda *a, **k: Failed())
    with pytest.raises(setup_env.SetupError) as failure:
        setup_env.build_mmcv_wheel(tmp_path / 'wheels' / 'key', 'cpu', {'FORCE_CUDA': '0'})
    message = str(failure.value)
    assert message.splitlines()[:4] == [
        'building mmcv 2.1.0 failed; the compiler said:',
        '  FAILED: [code=1] build/active_rotated_filter_cuda.o',
        '  torch/include/ATen/cuda/CUDAContextLight.h:10:10: fatal error: cusparse.h: No such file or directory',
        '  nms_cuda.cu(12): error: identifier "THCudaCheck" is undefined']
    build_log = tmp_path / 'wheels' / 'key.build.log'
    assert message.endswith(f'The whole build output is in {build_log}.')
    assert build_log.read_text() == output
    assert not (tmp_path / 'wheels' / 'key').exists()  # nothing published


def _toolkit(folder):
    _headers(folder / 'include', ['cuda_runtime.h'])
    _headers(folder / 'bin', ['nvcc'])
    return str(folder)


def test_the_toolkit_is_found_where_torch_guesses_wrong(setup_env, monkeypatch, tmp_path):
    # a wrapper script /usr/local/bin/nvcc makes torch guess /usr/local, which holds no CUDA header
    monkeypatch.setattr(setup_env, 'DEFAULT_CUDA_HOME', str(tmp_path / 'no-default'))
    wrong = tmp_path / 'usr-local'  # bin/nvcc (the wrapper) and an include folder, no CUDA header
    _headers(wrong / 'bin', ['nvcc'])
    _headers(wrong / 'include', ['zlib.h'])
    real = _toolkit(tmp_path / 'cuda-13.0')
    assert setup_env.cuda_toolkit(str(wrong), f'{real}/bin/nvcc', {}) == real
    monkeypatch.setattr(setup_env, 'DEFAULT_CUDA_HOME', real)
    assert setup_env.cuda_toolkit(str(wrong), str(wrong / 'bin' / 'nvcc'), {}) == real
    assert setup_env.cuda_toolkit(real, '', {}) == real  # a right guess is kept


def test_cuda_home_is_taken_as_given_and_named_when_it_holds_no_toolkit(setup_env, monkeypatch, tmp_path):
    real = _toolkit(tmp_path / 'cuda-13.0')
    other = _toolkit(tmp_path / 'cuda-12.8')
    assert setup_env.cuda_toolkit(real, '', {'CUDA_HOME': other}) == other
    with pytest.raises(setup_env.SetupError, match=r"no CUDA toolkit with nvcc and cuda_runtime.h found "
                       r"to compile mmcv's CUDA ops \(.*/empty\): install the CUDA toolkit and set CUDA_HOME"):
        setup_env.cuda_toolkit(real, '', {'CUDA_HOME': str(tmp_path / 'empty')})
    headers_only = tmp_path / 'nvidia-cu13'  # the runtime headers of torch's nvidia-* packages, no nvcc
    _headers(headers_only / 'include', ['cuda_runtime.h'])
    with pytest.raises(setup_env.SetupError, match='no CUDA toolkit with nvcc and cuda_runtime.h'):
        setup_env.cuda_toolkit(real, '', {'CUDA_HOME': str(headers_only)})


def _never_set_up(setup_env, monkeypatch):
    for step in ('check_python', 'ensure_venv', 'ensure_torch', 'ensure_mmcv', 'ensure_requirements'):
        monkeypatch.setattr(setup_env, step, lambda: pytest.fail(f'{step} ran'))


@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_help_prints_the_usage_and_sets_nothing_up(setup_env, monkeypatch, capsys, flag):
    _never_set_up(setup_env, monkeypatch)
    assert setup_env.main([flag]) == 0
    out = capsys.readouterr().out
    assert 'Usage:' in out and '--cuda-build-env [PYTHON]' in out and '--mmcv-wheel' in out
    assert 'TORCH_SPEC' in out  # the environment knobs are the set-up's options


def test_an_unknown_argument_is_one_sentence_and_sets_nothing_up(setup_env, monkeypatch, capsys):
    _never_set_up(setup_env, monkeypatch)
    assert setup_env.main(['--venv', 'x']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("[setup] ERROR: unknown argument '--venv'") and err.count('\n') == 0
    assert 'environment variables' in err and '--help' in err


def test_the_torch_pin_is_the_installed_distributions_version(setup_env, monkeypatch, tmp_path):
    """A fresh install pins what pip compares: the distribution's version (PyPI's CUDA torch
    2.11.0 has no local label there, while torch.__version__ says 2.11.0+cu130); the pin of the
    latter made every later install that needs torch a ResolutionImpossible."""
    installed = []
    answers = {'from importlib.metadata import version; print(version("torch"))':
               lambda: '2.11.0' if installed else None,
               'import torch; print(torch.__version__)': lambda: '2.11.0+cu130'}
    monkeypatch.setattr(setup_env, 'venv_python', lambda code: answers[code]())
    monkeypatch.setattr(setup_env, 'pip', lambda *args, **kwargs: installed.append(args))
    monkeypatch.setattr(setup_env, 'CONSTRAINTS', tmp_path / 'constraints.txt')
    monkeypatch.setattr(setup_env, 'log', lambda *args: None)
    monkeypatch.setenv('TORCH_SPEC', 'torch==2.11.0')
    assert setup_env.ensure_torch() == '2.11.0'
    assert installed == [('torch==2.11.0',)]
    assert (tmp_path / 'constraints.txt').read_text().splitlines()[0] == 'torch==2.11.0'
