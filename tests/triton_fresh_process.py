"""Running a kernel test file again in a fresh process, with Triton's interpreter on.

``TRITON_INTERPRET=1`` works only if it is set before triton is first imported, and under pytest
something (transformers, diffusers, torch._dynamo) has usually imported triton already. A kernel
test file then skips its kernel tests in-process and calls :func:`rerun_with_interpreter`, which
runs the whole file in a new interpreter where the variable is set from the start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def rerun_with_interpreter(test_file: str, fresh_var: str, reason: str | None, cuda: bool) -> None:
    """Run ``test_file`` again in a fresh process (``fresh_var`` marks it, so it cannot recurse)
    unless its kernels already ran here (``reason`` is None); fail on CUDA, where they must run."""
    if os.environ.get(fresh_var):
        assert reason is None, f"the fresh process cannot run the kernels either: {reason}"
        pytest.skip("this is the fresh process")
    if reason is None:
        pytest.skip("the kernel tests ran in this process")
    if cuda:
        pytest.fail(f"the kernels cannot run on this CUDA machine: {reason}")
    env = {**os.environ, fresh_var: "1", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", test_file],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout, result.stdout[-3000:]
