"""tools/{dist,slurm}_{train,test}.sh: the interpreter a user of this checkout expects, and bad arguments.

README's commands run `.venv/bin/python`; the launch scripts are called with `bash`, where no venv
is active, so unset ``PYTHON`` must mean the checkout's `.venv` (made by `make setup`), falling
back to `python` from PATH only where there is none. Each script is copied into a throwaway
checkout whose `.venv/bin/python`, PATH `python` and PATH `srun` are stubs that record how they
were called; nothing is trained.
"""
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RECORDER = '#!/bin/sh\necho "$(basename "$0") $0 $*" >> "$RECORD"\n'
# srun runs its command (the interpreter and its arguments) after its own options; of those the
# scripts pass, only `-p PARTITION` takes a separate value
SRUN = ('#!/bin/sh\necho "srun $*" >> "$RECORD"\n'
        'while [ "${1#-}" != "$1" ]; do [ "$1" = -p ] && shift; shift; done\nexec "$@"\n')

SCRIPTS = {
    'dist_train.sh': ['configs/x.py', '2', '--work-dir', 'wd'],
    'dist_test.sh': ['configs/x.py', 'ckpt.pth', '2'],
    'slurm_train.sh': ['PART', 'job', 'configs/x.py', '--work-dir', 'wd'],
    'slurm_test.sh': ['PART', 'job', 'configs/x.py', 'ckpt.pth'],
}


def _stub(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _inputs(folder):
    """The config and checkpoint that SCRIPTS name, in ``folder`` (the scripts' working
    directory): the scripts check they exist before launching anything."""
    for name in ('configs/x.py', 'ckpt.pth', 'c.py', 'k.pth'):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text('')


def _launch_recorded(tmp_path, script, argv):
    """``tools/script argv`` run in ``tmp_path`` with stubs for srun and the interpreter that
    record their calls in ``tmp_path/record.txt``."""
    _stub(tmp_path / 'bin/srun', SRUN)
    _stub(tmp_path / 'bin/python', RECORDER)
    env = dict(os.environ, PATH=f'{tmp_path / "bin"}{os.pathsep}/usr/bin{os.pathsep}/bin',
               RECORD=str(tmp_path / 'record.txt'), PYTHON=str(tmp_path / 'bin/python'))
    return subprocess.run(['bash', str(ROOT / 'tools' / script), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def _run(tmp_path, script, with_venv, python=None):
    checkout = tmp_path / 'checkout'
    (checkout / 'tools').mkdir(parents=True)
    for name in (script, 'launch_checks.sh'):
        shutil.copy(ROOT / 'tools' / name, checkout / 'tools' / name)
    if with_venv:
        _stub(checkout / '.venv/bin/python', RECORDER)
    _stub(tmp_path / 'bin/python', RECORDER)
    _stub(tmp_path / 'bin/srun', SRUN)
    _inputs(tmp_path)
    record = tmp_path / 'record.txt'
    env = {k: v for k, v in os.environ.items() if k != 'PYTHON'}
    env.update(PATH=f'{tmp_path / "bin"}{os.pathsep}/usr/bin{os.pathsep}/bin', RECORD=str(record))
    if python:
        env['PYTHON'] = python
    proc = subprocess.run(['bash', str(checkout / 'tools' / script), *SCRIPTS[script]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = record.read_text().splitlines()
    # the last line is the interpreter's own call: "python <path it ran as> <args>"
    name, path, *args = lines[-1].split()
    assert name == 'python', lines
    return checkout, Path(path), args, lines


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_unset_python_runs_the_checkouts_venv(tmp_path, script):
    checkout, interpreter, args, lines = _run(tmp_path, script, with_venv=True)
    assert interpreter == checkout / '.venv/bin/python'
    tool = 'train.py' if 'train' in script else 'test.py'
    assert any(a.endswith(f'tools/{tool}') for a in args), args
    if script.startswith('dist'):
        assert args[:2] == ['-m', 'torch.distributed.run'] and '--nproc_per_node=2' in args
    else:
        assert lines[0].startswith('srun ') and '--launcher=slurm' in args


@pytest.mark.parametrize('script', ['dist_train.sh', 'slurm_test.sh'])
def test_without_a_venv_python_comes_from_path(tmp_path, script):
    _, interpreter, _, _ = _run(tmp_path, script, with_venv=False)
    assert interpreter == tmp_path / 'bin/python'


@pytest.mark.parametrize('script', ['dist_test.sh', 'slurm_train.sh'])
def test_python_set_by_the_user_wins(tmp_path, script):
    _, interpreter, _, _ = _run(tmp_path, script, with_venv=True, python=str(tmp_path / 'bin/python'))
    assert interpreter == tmp_path / 'bin/python'


@pytest.mark.parametrize('script,argv', [
    ('dist_train.sh', ['configs/x.py']), ('dist_train.sh', ['configs/x.py', 'two']),
    ('dist_test.sh', ['configs/x.py', '2']), ('slurm_train.sh', ['PART', 'job']),
    ('slurm_test.sh', ['PART', 'job', 'configs/x.py'])])
def test_missing_arguments_print_the_usage_and_launch_nothing(tmp_path, script, argv):
    """torchrun's 'Unsupported nproc_per_node value' traceback, or an srun with empty values
    (slurm_test.sh without a checkpoint launched test.py anyway)."""
    proc = _launch_recorded(tmp_path, script, argv)
    assert proc.returncode == 2 and proc.stderr.startswith('error: usage: '), proc.stderr
    assert f'tools/{script} ' in proc.stderr.splitlines()[0]
    assert not (tmp_path / 'record.txt').exists()  # nothing ran


def test_a_busy_port_and_a_missing_srun_are_one_line(tmp_path):
    import socket
    _inputs(tmp_path)
    with socket.socket() as listener:
        listener.bind(('127.0.0.1', 0))
        listener.listen()
        port = listener.getsockname()[1]
        env = dict(os.environ, PORT=str(port))
        proc = subprocess.run(['bash', str(ROOT / 'tools/dist_train.sh'), 'configs/x.py', '2'],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f'error: PORT {port} is in use (another run on this machine?): set another, e.g. '
        f'PORT={port + 1} {ROOT}/tools/dist_train.sh ...')
    env = dict(os.environ, PATH=f'/usr/bin{os.pathsep}/bin')  # no srun there
    proc = subprocess.run(['bash', str(ROOT / 'tools/slurm_test.sh'), 'P', 'j', 'c.py', 'k.pth'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f'error: srun not found: {ROOT}/tools/slurm_test.sh submits through slurm; without slurm, '
        'launch with tools/dist_test.sh')


def test_slurm_scripts_keep_an_argument_with_spaces_whole(tmp_path):
    _inputs(tmp_path)
    args_stub = '#!/bin/sh\nfor a in "$@"; do echo "$a"; done > "$RECORD"\n'
    _stub(tmp_path / 'bin/srun', SRUN)
    _stub(tmp_path / 'bin/python', args_stub)
    record = tmp_path / 'args.txt'
    env = dict(os.environ, PATH=f'{tmp_path / "bin"}{os.pathsep}/usr/bin{os.pathsep}/bin',
               RECORD=str(record), PYTHON=str(tmp_path / 'bin/python'))
    proc = subprocess.run(['bash', str(ROOT / 'tools/slurm_train.sh'), 'P', 'j', 'c.py', '--work-dir',
                           'work_dirs/run 2'], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines()[-2:] == ['--work-dir', 'work_dirs/run 2']


CONFIG_MISSING = ('error: config {} does not exist; pass the path of a config file, e.g. one under '
                  'configs/ (docs/configs.md lists them).')
CHECKPOINT_MISSING = ('error: checkpoint {} does not exist; pass the .pth file written by training '
                      '(work_dirs/...) or by tools/fuse.py.')


@pytest.mark.timeout(60)
@pytest.mark.parametrize('script,argv,said', [
    ('dist_train.sh', ['configs/nope.py', '2'], CONFIG_MISSING.format('configs/nope.py')),
    ('dist_test.sh', ['configs/nope.py', 'ckpt.pth', '2'], CONFIG_MISSING.format('configs/nope.py')),
    ('dist_test.sh', ['configs/x.py', 'nope.pth', '2'], CHECKPOINT_MISSING.format('nope.pth')),
    ('dist_train.sh', ['configs', '2'], 'error: config configs is a folder, not a config file; pass '
                                         'a config file in it (docs/configs.md lists them).'),
    ('slurm_train.sh', ['P', 'j', 'nope.py'], CONFIG_MISSING.format('nope.py')),
    ('slurm_test.sh', ['P', 'j', 'nope.py', 'ckpt.pth'], CONFIG_MISSING.format('nope.py')),
    ('slurm_test.sh', ['P', 'j', 'c.py', 'nope.pth'], CHECKPOINT_MISSING.format('nope.pth')),
], ids=['dist-train-config', 'dist-test-config', 'dist-test-checkpoint', 'dist-train-folder',
        'slurm-train-config', 'slurm-test-config', 'slurm-test-checkpoint'])
def test_a_missing_config_or_checkpoint_is_one_line_before_anything_is_launched(tmp_path, script,
                                                                                argv, said):
    """tools/train.py's one-line error came once per process, then torchrun's 40-line
    ChildFailedError report and its 'Root Cause' block buried it; the scripts check the files as
    tools/train.py and tools/test.py would (same sentence), before torchrun or srun."""
    _inputs(tmp_path)
    proc = _launch_recorded(tmp_path, script, argv)
    assert (proc.returncode, proc.stderr, proc.stdout) == (1, said + '\n', ''), proc.stderr
    assert not (tmp_path / 'record.txt').exists()  # neither torchrun nor srun ran


@pytest.mark.timeout(60)
def test_a_checkpoint_url_is_left_to_the_tool(tmp_path):
    """tools/test.py loads a checkpoint URL itself (mmengine's loaders): nothing to check here."""
    _inputs(tmp_path)
    _stub(tmp_path / 'bin/python', RECORDER)
    url = 'https://example.org/upernet.pth'
    env = dict(os.environ, PATH=f'{tmp_path / "bin"}{os.pathsep}/usr/bin{os.pathsep}/bin',
               RECORD=str(tmp_path / 'url.txt'), PYTHON=str(tmp_path / 'bin/python'))
    proc = subprocess.run(['bash', str(ROOT / 'tools/dist_test.sh'), 'configs/x.py', url, '2'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert url in (tmp_path / 'url.txt').read_text().splitlines()[-1].split()
