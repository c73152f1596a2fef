// Build settings of the vectorised CPU loops; include FIRST in a csrc/cpu translation unit, so that every
// function after it (protoclr/math.h's helpers included, which must inline into the hot loops) shares them.
#pragma once

// Masked selects must if-convert to vectorise; GCC only does that without trapping math, which is how torch
// itself is built (-fno-trapping-math).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

// Runtime ISA dispatch for the float hot loops: setup.py builds for baseline x86-64 (SSE2), where the label/exp
// loops do not vectorise; GCC >= 12 emits AVX-512 and AVX2 clones picked at load time (ifunc).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define PROTOCLR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PROTOCLR_CPU_CLONES
#endif
#define PROTOCLR_ALWAYS_INLINE __attribute__((always_inline))
