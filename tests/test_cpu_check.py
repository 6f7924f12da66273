"""tools/cpu_check.sh: issue 16's CPU figures in one command. Here only its cheap steps run:
the CPU report and the per-test time limit firing on a throwaway sleeping test."""
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / 'tools' / 'cpu_check.sh'


def run(*args, **env):
    return subprocess.run(['bash', str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=200, env={**os.environ, 'CPU_CHECK_PYTHON': sys.executable,
                                            **env})


def test_bad_arguments_say_what_is_accepted(tmp_path):
    r = run('--fast')
    assert r.returncode == 2 and 'unknown option --fast' in r.stderr
    r = run(str(tmp_path / 'a'), str(tmp_path / 'b'))
    assert r.returncode == 2 and 'give one OUT_DIR' in r.stderr
    assert run().returncode == 2


def test_cpu_report_and_the_time_limit_firing(tmp_path):
    r = run(str(tmp_path), '--quick', CPU_CHECK_STEPS='cpu,timeout')
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / 'cpu_check.log').read_text()
    assert '== cpu: rc=0' in log and '== timeout: rc=0' in log
    assert 'large_dw' not in log  # only the steps asked for
    assert 'cpu: ' in (tmp_path / 'cpu.log').read_text()
    out = (tmp_path / 'timeout.log').read_text()
    assert 'Timeout' in out and 'in test_sleeps_past_the_limit' in out
    assert 'pytest exit status: 1' in out
