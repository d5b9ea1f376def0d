"""Tests whose fixtures or the libraries under them keep state between tests (bitsandbytes' CPU kernels and its
logger, module-scoped quantized models) pass in any order: here, backwards."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ORDER_SENSITIVE_FILES = ["test_quantization.py"]


@pytest.mark.parametrize("filename", ORDER_SENSITIVE_FILES)
def test_the_file_passes_backwards(filename):
    pytest.importorskip("bitsandbytes")
    pytest_command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    collected = subprocess.run(
        [*pytest_command, "--collect-only", str(TESTS / filename)], capture_output=True, text=True, cwd=TESTS.parent
    )
    # test ids only: a warnings summary names files too (`tests/conftest.py:116`), without "::"
    ids = [line for line in collected.stdout.splitlines() if line.startswith("tests/") and "::" in line]
    assert len(ids) > 10, collected.stdout + collected.stderr
    backwards = subprocess.run([*pytest_command, *reversed(ids)], capture_output=True, text=True, cwd=TESTS.parent)
    assert backwards.returncode == 0, backwards.stdout[-4000:]
    summary = backwards.stdout.splitlines()[-1]
    counts = {outcome: int(count) for count, outcome in re.findall(r"(\d+) (passed|skipped)", summary)}
    assert counts.get("passed", 0) + counts.get("skipped", 0) == len(ids) and counts["passed"] > 10, summary
