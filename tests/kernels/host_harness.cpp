// Host entry for tests/kernels/test_kernel_source.py: runs one "launch" of kv_copy.cu serially.
#include "host_shim.h"
#include "kv_copy.cu"

typedef void (*kvxfer_entry)(const char*, char*, const long long*, int, int, int, int, long long, long long,
                             long long, long long, unsigned int, unsigned int, unsigned int, unsigned int, int);

// Returns the number of out-of-bounds or misaligned accesses (0 when all is well), or -1 for a bad width.
extern "C" long long kvxfer_emulate(int vector_bytes, int num_ctas, const char* src, char* dst,
                                    const char* src_begin, const char* src_end, char* dst_begin, char* dst_end,
                                    const long long* table, int num_segments, int num_layer_parts, int row_heads,
                                    int row_vectors, long long src_token_stride, long long src_head_stride,
                                    long long dst_token_stride, long long dst_head_stride, unsigned int row_mul,
                                    unsigned int row_shr, unsigned int head_mul, unsigned int head_shr,
                                    int group_shift) {
    kvxfer_entry entry = vector_bytes == 1 ? kvxfer_copy_v1 : vector_bytes == 2 ? kvxfer_copy_v2
                       : vector_bytes == 4 ? kvxfer_copy_v4 : vector_bytes == 8 ? kvxfer_copy_v8
                       : vector_bytes == 16 ? kvxfer_copy_v16 : nullptr;
    if (!entry) return -1;
    kvxfer_read_span = {src_begin, src_end};
    kvxfer_write_span = {dst_begin, dst_end};
    kvxfer_violations = 0;
    gridDim = {(unsigned int)num_ctas, 1, 1};
    blockDim = {KVXFER_THREADS, 1, 1};
    for (unsigned int b = 0; b < gridDim.x; ++b) {
        for (unsigned int t = 0; t < blockDim.x; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            entry(src, dst, table, num_segments, num_layer_parts, row_heads, row_vectors, src_token_stride,
                  src_head_stride, dst_token_stride, dst_head_stride, row_mul, row_shr, head_mul, head_shr,
                  group_shift);
        }
    }
    return kvxfer_violations;
}
