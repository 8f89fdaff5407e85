"""The worker memory policy: freed tensor memory is reused instead of being mapped (and
page-faulted) afresh for every batch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocates and frees a 32 MB tensor 20 times, then prints the minor page faults of the loop.
PROBE = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from model.memory import retain_freed_memory
if {retain}:
    assert retain_freed_memory() and retain_freed_memory()  # idempotent
for _ in range(2):  # warm-up: the heap grows, thread pools start
    torch.ones(8 << 20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(8 << 20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(retain: bool) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), retain=retain)],
                         check=True, capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy")
def test_freed_tensors_are_reused_not_page_faulted_again():
    default, retained = _faults(False), _faults(True)
    pages = 20 * (32 << 20) // 4096  # every page of every fresh 32 MB block
    assert default > pages // 2, f"default policy faulted only {default} pages: the probe measures nothing"
    assert retained <= pages // 10, f"{retained} page faults with freed memory retained"
