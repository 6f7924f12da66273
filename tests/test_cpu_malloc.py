"""reparam_mm.cpu_malloc: freed large CPU blocks are reused instead of page-faulted again.

Each case runs in a fresh interpreter: the setting applies to a whole process.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from reparam_mm.cpu_malloc import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason='glibc malloc only (Linux)')

PROBE = r'''
import json, resource, sys
import torch
from reparam_mm.cpu_malloc import keep_freed_memory, kept_freed_memory, malloc_info
applied = keep_freed_memory() if sys.argv[1] == 'keep' else False
faults = []
for _ in range(5):  # allocate, touch and free 256 MB five times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64 << 20)
    info = malloc_info()
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(applied=applied, kept=kept_freed_memory(), faults=faults, info=info)))
'''

PAGES = (256 << 20) // 4096  # pages of the 256 MB block


def probe(mode, **env):
    out = subprocess.run([sys.executable, '-c', PROBE, mode], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_malloc_page_faults_a_large_block_every_time():
    r = probe('default')
    assert not r['applied'] and not r['kept']
    assert all(f > PAGES // 2 for f in r['faults']), r['faults']
    if r['info'] is not None:  # served by mmap
        assert r['info']['hblkhd'] >= 256 << 20


def test_kept_memory_serves_the_block_from_the_heap_and_reuses_it():
    r = probe('keep')
    assert r['applied'] and r['kept']
    assert r['faults'][0] > PAGES // 2  # the first time the heap grows: pages are new
    # glibc may place the block once more before it settles below the heap's top; then the
    # same pages are reused without faults
    assert sum(r['faults'][1:]) < 1.5 * PAGES, r['faults']
    assert all(f < PAGES // 20 for f in r['faults'][-2:]), r['faults']
    if r['info'] is not None:
        assert r['info']['hblkhd'] < 256 << 20 <= r['info']['arena']


def test_environment_variable_turns_it_off():
    r = probe('keep', REPARAM_MM_KEEP_FREED_MEMORY='0')
    assert not r['applied'] and not r['kept']
    assert all(f > PAGES // 2 for f in r['faults']), r['faults']


RELEASE = r'''
import json
import torch
from reparam_mm.cpu_malloc import keep_freed_memory, release_freed_memory


def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:')) / 1024


assert keep_freed_memory()
base = rss_mb()
x = torch.ones(64 << 20)
del x
kept = rss_mb()
released = release_freed_memory()
print(json.dumps(dict(base=base, kept=kept, after=rss_mb(), released=released)))
'''


def test_release_hands_the_kept_memory_back():
    out = subprocess.run([sys.executable, '-c', RELEASE], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r['kept'] - r['base'] > 200  # the freed 256 MB block stayed resident
    assert r['released'] and r['kept'] - r['after'] > 200  # and went back to the kernel
