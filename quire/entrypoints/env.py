"""``quire env``: the machine as Quire sees it (CPU, ISA levels, the kernels' level, the linear plan)."""

from __future__ import annotations

import argparse
import os
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from quire.kernels import cpu_kernel
    from quire.models.calibration import linear_plan

    cores, threads = os.cpu_count(), torch.get_num_threads()
    print(f"cpu: {cpu_kernel.cpu_model()} ({platform.machine()}), {cores} cores, torch threads {threads}")
    print(f"isa levels: {' '.join(cpu_kernel.isa_levels())}")
    level = cpu_kernel.isa_level()
    kernels = cpu_kernel.kernels()
    print(f"kernels: {level}" + ("" if kernels is not None else " (not built: the PyTorch reference paths run)"))
    for dtype in (torch.float32, torch.bfloat16):
        print(f"linears {str(dtype).removeprefix('torch.')}: {linear_plan(kernels, dtype).describe()}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"cuda: {names} (device=auto runs there)")
    else:
        print(f"cuda: none visible to torch {torch.__version__} (device=auto runs on the CPU)")
    return 0
