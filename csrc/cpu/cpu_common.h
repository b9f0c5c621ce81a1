// Shared by every csrc/cpu/<family>.cpp (see README.md in this folder).
#pragma once

// FASTFUSE_CPU_CLONES on a hot function: GCC compiles it for AVX-512 (x86-64-v4), AVX2 (haswell)
// and baseline x86-64 and picks one at load time, so one wheel runs everywhere and vectorises
// wide where it can (no -march=native). Clang's target_clones does not accept every function
// template GCC does, so other compilers get the baseline build only.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define FASTFUSE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
#else
#define FASTFUSE_CPU_CLONES
#endif
