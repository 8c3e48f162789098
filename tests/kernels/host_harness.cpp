// Host entry for tests/kernels/test_kernel_source.py: runs one "launch" of kv_copy.cu serially.
#include <cstring>

#include "host_shim.h"
#include "kv_copy.cu"

typedef void (*kvxfer_entry)(const char*, char*, const long long*, int, int, unsigned int, unsigned int, int, int,
                             long long, long long, long long, long long, unsigned int, unsigned int, unsigned int,
                             unsigned int, int);

#define KVXFER_ENTRIES(W) {"kvxfer_run_v" #W, kvxfer_run_v##W}, {"kvxfer_rows_v" #W, kvxfer_rows_v##W}, \
                          {"kvxfer_rows_wide_v" #W, kvxfer_rows_wide_v##W}

static const struct { const char* name; kvxfer_entry entry; } kvxfer_entries[] = {
    KVXFER_ENTRIES(1), KVXFER_ENTRIES(2), KVXFER_ENTRIES(4), KVXFER_ENTRIES(8), KVXFER_ENTRIES(16)};

// Returns the number of out-of-bounds or misaligned accesses (0 when all is well), -1 for an unknown entry, -2 for
// a block size other than the compiled KVXFER_THREADS.
extern "C" long long kvxfer_emulate(const char* name, int num_ctas, int threads, const char* src, char* dst,
                                    const char* src_begin, const char* src_end, char* dst_begin, char* dst_end,
                                    const long long* table, int num_segments, int num_layer_parts,
                                    unsigned int seg_mul, unsigned int seg_shr, int unit_rows, int row_vectors,
                                    long long src_unit_stride, long long src_row_stride, long long dst_unit_stride,
                                    long long dst_row_stride, unsigned int row_mul, unsigned int row_shr,
                                    unsigned int rows_mul, unsigned int rows_shr, int group_shift) {
    kvxfer_entry entry = nullptr;
    for (const auto& candidate : kvxfer_entries) {
        if (std::strcmp(candidate.name, name) == 0) entry = candidate.entry;
    }
    if (!entry) return -1;
    if (threads != KVXFER_THREADS) return -2;
    kvxfer_read_span = {src_begin, src_end};
    kvxfer_write_span = {dst_begin, dst_end};
    kvxfer_violations = 0;
    gridDim = {(unsigned int)num_ctas, 1, 1};
    blockDim = {(unsigned int)threads, 1, 1};
    for (unsigned int b = 0; b < gridDim.x; ++b) {
        for (unsigned int t = 0; t < blockDim.x; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            entry(src, dst, table, num_segments, num_layer_parts, seg_mul, seg_shr, unit_rows, row_vectors,
                  src_unit_stride, src_row_stride, dst_unit_stride, dst_row_stride, row_mul, row_shr, rows_mul,
                  rows_shr, group_shift);
        }
    }
    return kvxfer_violations;
}
