// Host entry for tests/kernels/test_id_copy_source.py: runs one "launch" of id_copy.cu serially (after kv_copy.cu,
// as the launcher compiles them).
#include <cstring>

#include "host_shim.h"
#include "kv_copy.cu"
#include "id_copy.cu"

typedef void (*kvxfer_ids_entry)(const char*, char*, const long long*);

#define KVXFER_IDS_ENTRIES(W)                                                                                      \
    {"kvxfer_ids_run_v" #W, kvxfer_ids_run_v##W}, {"kvxfer_ids_run_wide_v" #W, kvxfer_ids_run_wide_v##W},          \
        {"kvxfer_ids_rows_v" #W, kvxfer_ids_rows_v##W}, {"kvxfer_ids_rows_wide_v" #W, kvxfer_ids_rows_wide_v##W}

static const struct { const char* name; kvxfer_ids_entry entry; } kvxfer_ids_entries[] = {
    KVXFER_IDS_ENTRIES(1), KVXFER_IDS_ENTRIES(2), KVXFER_IDS_ENTRIES(4), KVXFER_IDS_ENTRIES(8),
    KVXFER_IDS_ENTRIES(16)};

// Returns the number of out-of-bounds or misaligned accesses (0 when all is well), -1 for an unknown entry, -2 for
// a block size other than the compiled KVXFER_THREADS.
extern "C" long long kvxfer_ids_emulate(const char* name, int num_ctas, int threads, const char* src, char* dst,
                                        const char* src_begin, const char* src_end, char* dst_begin, char* dst_end,
                                        const long long* buffer) {
    kvxfer_ids_entry entry = nullptr;
    for (const auto& candidate : kvxfer_ids_entries) {
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
            entry(src, dst, buffer);
        }
    }
    return kvxfer_violations;
}
