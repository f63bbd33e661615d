"""``quire env``: the machine as Quire sees it (CPU, ISA levels, the kernels' level, the linear plan)."""

from __future__ import annotations

import argparse
import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``platform.processor()`` is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model", "CPU part")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def add_parser(commands) -> None:
    parser = commands.add_parser("env", help="print the CPU, its ISA levels and the kernel paths chosen for it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quire.attention import cpu_kernel
    from quire.models.calibration import linear_plan

    print(f"cpu: {cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"isa levels: {' '.join(cpu_kernel.isa_levels())}")
    level = cpu_kernel.isa_level()
    kernels = cpu_kernel.kernels()
    print(f"kernels: {level}" + ("" if kernels is not None else " (not built: the PyTorch reference paths run)"))
    for dtype in (torch.float32, torch.bfloat16):
        print(f"linears {str(dtype).removeprefix('torch.')}: {linear_plan(kernels, dtype).describe()}")
    return 0
