// The one KV copy kernel: for every (layer-part, token segment) box, copy tokens x heads rows of contiguous bytes
// between two strided layouts. Host planning (kvxfer/kernels/copy_plan.py, KernelTables) builds the tables.
//
// Plain C++ for NVRTC: no headers, no host code, extern "C" entry points (one per load/store width) so no name
// mangling is involved. tests/kernels/test_kernel_source.py also compiles this file as host C++ with a shim and
// runs it serially, thread by thread, against the NumPy reference.
//
// Work split: a CTA of blockDim.x threads is cut into groups of 2**group_shift threads; each group copies one box
// at a time and strides over boxes (persistent grid). Inside a box, vector v (of `VecBytes` bytes) is column
// v % row_vectors of row v / row_vectors, and row r is token r / row_heads, head r % row_heads. Each thread keeps
// KVXFER_UNROLL loads in flight before storing them.

// The launcher (_cuda.py) passes both with -D from copy_plan.py's constants; these defaults are for compile checks.
#ifndef KVXFER_UNROLL
#define KVXFER_UNROLL 4
#endif
#ifndef KVXFER_THREADS
#define KVXFER_THREADS 256
#endif
// 1: load the next box's table entries before copying the current box.
#ifndef KVXFER_PREFETCH
#define KVXFER_PREFETCH 1
#endif
// CTAs per SM the compiler must fit (caps registers per thread: 5 x 256 threads fit 48 registers, no spills).
#ifndef KVXFER_MIN_CTAS
#define KVXFER_MIN_CTAS 5
#endif
// A test hook: the host emulation checks every access's bounds and alignment; on the GPU it is nothing.
#ifndef KVXFER_ACCESS_HOOK
#define KVXFER_ACCESS_HOOK(is_store, ptr, nbytes)
#endif

struct __align__(16) kvxfer_vec16 { unsigned int x, y, z, w; };
struct __align__(8) kvxfer_vec8 { unsigned int x, y; };

// n / d for 0 <= n < 2**31 with (mul, shr) from copy_plan.fast_divisor(d); mul == 0 means d == 1.
__device__ __forceinline__ unsigned int kvxfer_divide(unsigned int n, unsigned int mul, unsigned int shr) {
    return mul == 0u ? n : (__umulhi(n, mul) >> shr);
}

// Where one box starts on each side (region start + layer-part + segment), and how many vectors it holds.
struct kvxfer_box {
    long long src;
    long long dst;
    int vectors;
};

__device__ __forceinline__ kvxfer_box kvxfer_load_box(const long long* __restrict__ table, int box, int num_segments,
                                                      int num_layer_parts, int row_vectors_per_token) {
    const int layer_part = box / num_segments;
    const int segment = box - layer_part * num_segments;
    const long long* part_src = table + 3 * num_segments;
    kvxfer_box result;
    result.src = part_src[layer_part] + table[segment];
    result.dst = part_src[num_layer_parts + layer_part] + table[num_segments + segment];
    result.vectors = (int)table[2 * num_segments + segment] * row_vectors_per_token;
    return result;
}

template <typename Vec>
__device__ __forceinline__ void kvxfer_copy_boxes(
    const char* __restrict__ src, char* __restrict__ dst, const long long* __restrict__ table,
    int num_segments, int num_layer_parts, int row_heads, int row_vectors,
    long long src_token_stride, long long src_head_stride, long long dst_token_stride, long long dst_head_stride,
    unsigned int row_mul, unsigned int row_shr, unsigned int head_mul, unsigned int head_shr, int group_shift) {
    const int group_size = 1 << group_shift;
    const int lane = threadIdx.x & (group_size - 1);
    const int groups_per_cta = blockDim.x >> group_shift;
    const int num_boxes = num_segments * num_layer_parts;
    const int box_stride = gridDim.x * groups_per_cta;
    const int vec_stride = group_size * KVXFER_UNROLL;
    const int per_token = row_heads * row_vectors;
    const int first_box = blockIdx.x * groups_per_cta + (threadIdx.x >> group_shift);

#if KVXFER_PREFETCH
    // The next box's table entries load while this box's bytes move: their latency leaves the critical path.
    kvxfer_box next = {0, 0, 0};
    if (first_box < num_boxes) next = kvxfer_load_box(table, first_box, num_segments, num_layer_parts, per_token);
#endif
    for (int box = first_box; box < num_boxes; box += box_stride) {
#if KVXFER_PREFETCH
        const kvxfer_box current = next;
        if (box + box_stride < num_boxes) {
            next = kvxfer_load_box(table, box + box_stride, num_segments, num_layer_parts, per_token);
        }
#else
        const kvxfer_box current = kvxfer_load_box(table, box, num_segments, num_layer_parts, per_token);
#endif
        const char* box_src = src + current.src;
        char* box_dst = dst + current.dst;
        const int num_vectors = current.vectors;

        for (int first = lane; first < num_vectors; first += vec_stride) {
            Vec values[KVXFER_UNROLL];
            long long dst_offsets[KVXFER_UNROLL];
#pragma unroll
            for (int u = 0; u < KVXFER_UNROLL; ++u) {
                const int v = first + u * group_size;
                if (v < num_vectors) {
                    const unsigned int row = kvxfer_divide((unsigned int)v, row_mul, row_shr);
                    const unsigned int column = (unsigned int)v - row * (unsigned int)row_vectors;
                    const unsigned int token = kvxfer_divide(row, head_mul, head_shr);
                    const unsigned int head = row - token * (unsigned int)row_heads;
                    const long long byte = (long long)column * (long long)sizeof(Vec);
                    const long long src_offset = (long long)token * src_token_stride
                                                 + (long long)head * src_head_stride + byte;
                    dst_offsets[u] = (long long)token * dst_token_stride + (long long)head * dst_head_stride + byte;
                    KVXFER_ACCESS_HOOK(0, box_src + src_offset, sizeof(Vec));
                    values[u] = *reinterpret_cast<const Vec*>(box_src + src_offset);
                }
            }
#pragma unroll
            for (int u = 0; u < KVXFER_UNROLL; ++u) {
                if (first + u * group_size < num_vectors) {
                    KVXFER_ACCESS_HOOK(1, box_dst + dst_offsets[u], sizeof(Vec));
                    *reinterpret_cast<Vec*>(box_dst + dst_offsets[u]) = values[u];
                }
            }
        }
    }
}

#define KVXFER_DEFINE_COPY(NAME, VEC)                                                                              \
    extern "C" __global__ void __launch_bounds__(KVXFER_THREADS, KVXFER_MIN_CTAS) NAME(                             \
        const char* __restrict__ src, char* __restrict__ dst, const long long* __restrict__ table,                  \
        int num_segments, int num_layer_parts, int row_heads, int row_vectors,                                      \
        long long src_token_stride, long long src_head_stride, long long dst_token_stride,                          \
        long long dst_head_stride, unsigned int row_mul, unsigned int row_shr, unsigned int head_mul,               \
        unsigned int head_shr, int group_shift) {                                                                   \
        kvxfer_copy_boxes<VEC>(src, dst, table, num_segments, num_layer_parts, row_heads, row_vectors,              \
                               src_token_stride, src_head_stride, dst_token_stride, dst_head_stride, row_mul,       \
                               row_shr, head_mul, head_shr, group_shift);                                           \
    }

KVXFER_DEFINE_COPY(kvxfer_copy_v1, unsigned char)
KVXFER_DEFINE_COPY(kvxfer_copy_v2, unsigned short)
KVXFER_DEFINE_COPY(kvxfer_copy_v4, unsigned int)
KVXFER_DEFINE_COPY(kvxfer_copy_v8, kvxfer_vec8)
KVXFER_DEFINE_COPY(kvxfer_copy_v16, kvxfer_vec16)
