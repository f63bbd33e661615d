"""The kernels' sources compile for aarch64 (NEON and scalar levels) with the flags the build uses there.

Built here with a cross compiler, syntax and templates only: no aarch64 machine runs the tests, but
a source that only compiles on x86 (an unguarded intrinsic, an x86-only header) fails here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

from quire.kernels import cpu_kernel

CROSS = "aarch64-linux-gnu-g++"

pytestmark = pytest.mark.skipif(shutil.which(CROSS) is None, reason=f"{CROSS} not installed (make setup installs it)")


@pytest.mark.parametrize("level", ["scalar", "neon"])
@pytest.mark.parametrize("source", cpu_kernel.sources(), ids=lambda p: Path(p).name)
def test_sources_compile_for_aarch64(level, source):
    flags = cpu_kernel.build_flags(level, machine="aarch64")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    command = [CROSS, "-std=c++20", "-fsyntax-only", "-Wno-psabi", *flags, *includes, str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
