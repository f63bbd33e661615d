// Which vector paths this build of the kernels has. cpu_kernel.py compiles one library per ISA
// level with explicit target flags (never -march=native alone), so a machine can build and test
// every level it can run:
//   scalar       QUIRE_SCALAR: only the portable scalar loops (the reference the tests compare with)
//   avx2         x86-64-v3 (AVX2, FMA, F16C): the portable paths on ATen's 256-bit Vectorized<float>
//   avx512       x86-64-v4: the hand-written AVX-512 paths, and the portable ones on 512-bit vectors
//   avx512_bf16  + AVX512-BF16 and VNNI (VDPBF16PS in the bf16 products)
//   amx          + AMX tiles (bf16 GGUF linears on the tile unit)
//   neon         aarch64: the portable paths on ATen's 128-bit NEON vectors
// The build defines CPU_CAPABILITY (ATen's vector-layer namespace) and CPU_CAPABILITY_AVX2 /
// CPU_CAPABILITY_AVX512 to match the target flags.
#pragma once

#if !defined(QUIRE_SCALAR) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define QUIRE_AVX512 1
#include <immintrin.h>
#else
#define QUIRE_AVX512 0
#endif

#if !defined(QUIRE_SCALAR)
#define QUIRE_VEC 1
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#else
#define QUIRE_VEC 0
#endif
