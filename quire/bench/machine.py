"""What the machine can do, measured in the same run as the figures it bounds.

* read bandwidth: GB/s of a multi-threaded sum over a buffer far larger than any cache;
* GEMM peak: GFLOP/s of a 1024-cube matrix product in a dtype, the faster of ``torch.mm`` (MKL,
  which on some vendors' CPUs does not use their widest vectors) and oneDNN on a reordered weight;
* the weight-read bound of one decode step: the bytes of weights a one-row step reads (the
  block format where the block path serves one row), divided by the read bandwidth.
"""

from __future__ import annotations

import time

import torch

BANDWIDTH_BYTES = 1 << 30  # 1 GiB: far past the last-level cache
GEMM_SIZE = 1024  # 2 GFLOP a product: long enough to time, short where a dtype has no fast path
REPEATS = 5


def read_bandwidth_gbs() -> float:
    """Best of a few full reads of a 1 GiB float32 buffer (``torch.sum`` over all threads)."""
    x = torch.ones(BANDWIDTH_BYTES // 4)
    x.sum()  # first touch
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return BANDWIDTH_BYTES / best / 1e9


def gemm_peak_gflops(dtype: torch.dtype) -> float:
    """Best of a few 1024 x 1024 x 1024 products: ``torch.mm`` and, where it runs, oneDNN, in ``dtype``
    and in float32 (a CPU without bf16 arithmetic multiplies bf16 fastest by widening it, as the
    kernels do, so float32's rate is the peak a bf16 step can be held to there)."""
    from quire.models.calibration import onednn_available

    products = []
    for kind in dict.fromkeys((dtype, torch.float32)):
        a = torch.randn(GEMM_SIZE, GEMM_SIZE).to(kind)
        b = torch.randn(GEMM_SIZE, GEMM_SIZE).to(kind)
        products.append(lambda a=a, b=b: torch.mm(a, b))
        if onednn_available(kind):
            packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
            products.append(lambda a=a, p=packed: torch.ops.mkldnn._linear_pointwise(a, p, None, "none", [], ""))
    best = float("inf")
    for product in products:
        product()
        for _ in range(REPEATS):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
    return 2 * GEMM_SIZE**3 / best / 1e9
