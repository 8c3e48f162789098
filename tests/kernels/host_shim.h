// Lets csrc/kv_copy.cu compile as host C++ so tests can run it serially, one (block, thread) at a time. The kernel
// uses no shared memory and no barriers, so running threads one after another is an exact emulation. Every access
// goes through KVXFER_ACCESS_HOOK, which checks bounds and alignment against the buffers the harness registers.
#pragma once
#include <cstdint>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct kvxfer_dim3 { unsigned int x, y, z; };
static kvxfer_dim3 threadIdx, blockIdx, blockDim, gridDim;

static inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return (unsigned int)(((unsigned long long)a * (unsigned long long)b) >> 32);
}

struct kvxfer_span { const char* begin; const char* end; };
static kvxfer_span kvxfer_read_span, kvxfer_write_span;
static long long kvxfer_violations = 0;

static inline void kvxfer_check(int is_store, const char* ptr, unsigned long nbytes) {
    const kvxfer_span& span = is_store ? kvxfer_write_span : kvxfer_read_span;
    if (ptr < span.begin || ptr + nbytes > span.end || ((uintptr_t)ptr) % nbytes != 0) ++kvxfer_violations;
}
#define KVXFER_ACCESS_HOOK(is_store, ptr, nbytes) kvxfer_check((is_store), (const char*)(ptr), (nbytes))
