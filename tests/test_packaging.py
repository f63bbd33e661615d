"""A wheel built from the sources carries everything the kernels compile from, and they load from it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from quire.kernels import cpu_kernel

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_an_installed_wheel_builds_and_runs_the_kernels(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True)
    (wheel,) = wheels.glob("quire-*.whl")
    shipped = {Path(name).name for name in zipfile.ZipFile(wheel).namelist() if "/csrc/" in name}
    assert shipped == {p.name for p in (ROOT / "quire/kernels/csrc").iterdir()}
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    # The installed copy, not this checkout, builds the engine's level into a fresh extension dir.
    probe = f"""
import quire, torch
from quire.kernels import cpu_kernel as c
assert quire.__file__.startswith({str(target)!r}), quire.__file__
ops = c.kernels()
x, w = torch.randn(3, 64), torch.ones(64)
torch.testing.assert_close(ops.add_rms_norm(x, None, w, 1e-6), torch.nn.functional.rms_norm(x, (64,), w, 1e-6))
print(c.level_of(ops))
"""
    env = {**os.environ, "PYTHONPATH": str(target), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == cpu_kernel.isa_level()
