"""The compiled CPU kernels: paged attention, the fused layer ops, the block-format linears and the
sampler's reductions, one library per ISA level (``cpu_kernel``; sources in ``csrc/``)."""
