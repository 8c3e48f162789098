// The one KV copy kernel: for every (layer-part, token segment) box, copy rows of contiguous bytes between two
// strided layouts. Host planning (kvxfer/kernels/copy_plan.py, KernelTables) builds the tables and folds every
// dimension that is contiguous on both sides into the rows; kvxfer/kernels/launch.py picks the entry and grid.
//
// Plain C++ for NVRTC: no headers, no host code, extern "C" entry points (one per form and load/store width) so no
// name mangling is involved. tests/kernels/test_kernel_source.py also compiles this file as host C++ with a shim and
// runs it serially, thread by thread, against the NumPy reference.
//
// A box is `count` units (count from the table) x `unit_rows` rows x `row_vectors` vectors of `VecBytes` bytes.
// Entries:
//   kvxfer_run_v{W}        every box is one contiguous run on both sides: vector v sits at byte v * W. No index math.
//   kvxfer_rows_v{W}       rows: vector v is (unit, row, column); offsets are 32-bit (planning checked they fit).
//   kvxfer_rows_wide_v{W}  the same with 64-bit offsets (exotic padded layouts whose boxes span >= 2 GiB).
// The rows entries never divide per vector: each thread splits its first vector index (its lane) and the group
// size into digits once, then steps its digits with carries.
//
// Work split: a CTA of blockDim.x threads is cut into groups of 2**group_shift threads; each group copies one box
// at a time and, when the grid is smaller than the boxes, strides over boxes. Each thread keeps KVXFER_UNROLL loads
// in flight before storing them.

// The launcher (_cuda.py) passes these with -D from launch.KernelTuning; these defaults are for compile checks.
#ifndef KVXFER_UNROLL
#define KVXFER_UNROLL 4
#endif
#ifndef KVXFER_THREADS
#define KVXFER_THREADS 256
#endif
// 1: load the next box's table entries before copying the current box (matters only when groups stride).
#ifndef KVXFER_PREFETCH
#define KVXFER_PREFETCH 1
#endif
// CTAs per SM the compiler must fit (caps registers per thread: 5 x 256 threads fit 48 registers, no spills).
#ifndef KVXFER_MIN_CTAS
#define KVXFER_MIN_CTAS 5
#endif
// 1: 16-byte loads and stores carry the .cs (streaming, evict-first) cache hint: each byte is touched once.
#ifndef KVXFER_STREAMING
#define KVXFER_STREAMING 0
#endif
// A test hook: the host emulation checks every access's bounds and alignment; on the GPU it is nothing.
#ifndef KVXFER_ACCESS_HOOK
#define KVXFER_ACCESS_HOOK(is_store, ptr, nbytes)
#endif

struct __align__(16) kvxfer_vec16 { unsigned int x, y, z, w; };
struct __align__(8) kvxfer_vec8 { unsigned int x, y; };

// Plain loads and stores, or for 16 bytes with KVXFER_STREAMING the .cs hint (GPU only: the host emulation has no
// PTX and runs the plain path, which moves the same bytes).
template <typename Vec>
__device__ __forceinline__ Vec kvxfer_load(const Vec* ptr) { return *ptr; }
template <typename Vec>
__device__ __forceinline__ void kvxfer_store(Vec* ptr, const Vec& value) { *ptr = value; }
#if KVXFER_STREAMING && defined(__CUDA_ARCH__)
template <>
__device__ __forceinline__ kvxfer_vec16 kvxfer_load<kvxfer_vec16>(const kvxfer_vec16* ptr) {
    kvxfer_vec16 v;
    asm("ld.global.cs.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
    return v;
}
template <>
__device__ __forceinline__ void kvxfer_store<kvxfer_vec16>(kvxfer_vec16* ptr, const kvxfer_vec16& v) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" :: "l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}
#endif

// n / d for 0 <= n < 2**31 with (mul, shr) from launch.fast_divisor(d); mul == 0 means d == 1.
__device__ __forceinline__ unsigned int kvxfer_divide(unsigned int n, unsigned int mul, unsigned int shr) {
    return mul == 0u ? n : (__umulhi(n, mul) >> shr);
}

// Where one box starts on each side (region start + layer-part + segment), and its unit count.
struct kvxfer_box {
    long long src;
    long long dst;
    unsigned int count;
};

// The launch-wide constants every entry takes (one struct so the entries share one signature).
struct kvxfer_args {
    const long long* table;
    int num_segments, num_layer_parts;
    unsigned int seg_mul, seg_shr;
    int unit_rows, row_vectors;
    long long src_unit_stride, src_row_stride, dst_unit_stride, dst_row_stride;
    unsigned int row_mul, row_shr, rows_mul, rows_shr;
    int group_shift;
};

__device__ __forceinline__ kvxfer_box kvxfer_load_box(const kvxfer_args& a, unsigned int box) {
    const unsigned int layer_part = kvxfer_divide(box, a.seg_mul, a.seg_shr);
    const unsigned int segment = box - layer_part * (unsigned int)a.num_segments;
    const long long* part = a.table + 3 * a.num_segments;
    kvxfer_box result;
    result.src = part[layer_part] + a.table[segment];
    result.dst = part[a.num_layer_parts + layer_part] + a.table[a.num_segments + segment];
    result.count = (unsigned int)a.table[2 * a.num_segments + segment];
    return result;
}

// A vector index inside a box as digits: unit, row in the unit, column (vectors) in the row.
struct kvxfer_digits {
    unsigned int unit, row, column;
};

__device__ __forceinline__ kvxfer_digits kvxfer_split(unsigned int v, const kvxfer_args& a) {
    const unsigned int rows = kvxfer_divide(v, a.row_mul, a.row_shr);
    kvxfer_digits d;
    d.column = v - rows * (unsigned int)a.row_vectors;
    d.unit = kvxfer_divide(rows, a.rows_mul, a.rows_shr);
    d.row = rows - d.unit * (unsigned int)a.unit_rows;
    return d;
}

// d += step, digit by digit with carries (each digit of d and step is below its radix, so one carry at most).
__device__ __forceinline__ void kvxfer_advance(kvxfer_digits& d, const kvxfer_digits& step, unsigned int row_vectors,
                                               unsigned int unit_rows) {
    d.column += step.column;
    const unsigned int column_carry = d.column >= row_vectors ? 1u : 0u;
    d.column -= column_carry * row_vectors;
    d.row += step.row + column_carry;
    const unsigned int row_carry = d.row >= unit_rows ? 1u : 0u;
    d.row -= row_carry * unit_rows;
    d.unit += step.unit + row_carry;
}

// Boxes of this group, in order, with the next box's table entries loaded early (KVXFER_PREFETCH).
struct kvxfer_box_walk {
    unsigned int box, stride, num_boxes;
    kvxfer_box next;
};

__device__ __forceinline__ kvxfer_box_walk kvxfer_walk_start(const kvxfer_args& a) {
    const unsigned int groups_per_cta = blockDim.x >> a.group_shift;
    kvxfer_box_walk walk;
    walk.box = blockIdx.x * groups_per_cta + (threadIdx.x >> a.group_shift);
    walk.stride = gridDim.x * groups_per_cta;
    walk.num_boxes = (unsigned int)a.num_segments * (unsigned int)a.num_layer_parts;
    walk.next.src = walk.next.dst = 0;
    walk.next.count = 0;
#if KVXFER_PREFETCH
    if (walk.box < walk.num_boxes) walk.next = kvxfer_load_box(a, walk.box);
#endif
    return walk;
}

__device__ __forceinline__ kvxfer_box kvxfer_walk_take(kvxfer_box_walk& walk, const kvxfer_args& a) {
#if KVXFER_PREFETCH
    const kvxfer_box current = walk.next;
    if (walk.box + walk.stride < walk.num_boxes) walk.next = kvxfer_load_box(a, walk.box + walk.stride);
    return current;
#else
    return kvxfer_load_box(a, walk.box);
#endif
}

// Every box one contiguous run on both sides: `count * row_vectors` vectors at consecutive addresses.
template <typename Vec>
__device__ __forceinline__ void kvxfer_copy_run(const char* __restrict__ src, char* __restrict__ dst,
                                                const kvxfer_args& a) {
    const unsigned int group_size = 1u << a.group_shift;
    const unsigned int lane = threadIdx.x & (group_size - 1u);
    kvxfer_box_walk walk = kvxfer_walk_start(a);
    for (; walk.box < walk.num_boxes; walk.box += walk.stride) {
        const kvxfer_box current = kvxfer_walk_take(walk, a);
        const Vec* box_src = reinterpret_cast<const Vec*>(src + current.src);
        Vec* box_dst = reinterpret_cast<Vec*>(dst + current.dst);
        const unsigned int num_vectors = current.count * (unsigned int)a.row_vectors;
        for (unsigned int first = lane; first < num_vectors; first += group_size * KVXFER_UNROLL) {
            Vec values[KVXFER_UNROLL];
#pragma unroll
            for (int u = 0; u < KVXFER_UNROLL; ++u) {
                const unsigned int v = first + u * group_size;
                if (v < num_vectors) {
                    KVXFER_ACCESS_HOOK(0, box_src + v, sizeof(Vec));
                    values[u] = kvxfer_load(box_src + v);
                }
            }
#pragma unroll
            for (int u = 0; u < KVXFER_UNROLL; ++u) {
                const unsigned int v = first + u * group_size;
                if (v < num_vectors) {
                    KVXFER_ACCESS_HOOK(1, box_dst + v, sizeof(Vec));
                    kvxfer_store(box_dst + v, values[u]);
                }
            }
        }
    }
}

// Boxes of rows: vector (unit, row, column) at unit * unit_stride + row * row_stride + column * sizeof(Vec).
template <typename Vec, typename Offset>
__device__ __forceinline__ void kvxfer_copy_rows(const char* __restrict__ src, char* __restrict__ dst,
                                                 const kvxfer_args& a) {
    const unsigned int group_size = 1u << a.group_shift;
    const unsigned int lane = threadIdx.x & (group_size - 1u);
    const unsigned int row_vectors = (unsigned int)a.row_vectors, unit_rows = (unsigned int)a.unit_rows;
    const Offset src_unit = (Offset)a.src_unit_stride, src_row = (Offset)a.src_row_stride;
    const Offset dst_unit = (Offset)a.dst_unit_stride, dst_row = (Offset)a.dst_row_stride;
    const Offset vec = (Offset)sizeof(Vec);
    // Split once per thread; the loop below only adds.
    const kvxfer_digits start = kvxfer_split(lane, a), step = kvxfer_split(group_size, a);
    kvxfer_box_walk walk = kvxfer_walk_start(a);
    for (; walk.box < walk.num_boxes; walk.box += walk.stride) {
        const kvxfer_box current = kvxfer_walk_take(walk, a);
        const char* box_src = src + current.src;
        char* box_dst = dst + current.dst;
        const unsigned int num_vectors = current.count * unit_rows * row_vectors;
        kvxfer_digits d = start;
        for (unsigned int first = lane; first < num_vectors; first += group_size * KVXFER_UNROLL) {
            Vec values[KVXFER_UNROLL];
            Offset dst_offsets[KVXFER_UNROLL];
#pragma unroll
            for (int u = 0; u < KVXFER_UNROLL; ++u) {
                if (first + u * group_size < num_vectors) {
                    const Offset src_offset = (Offset)d.unit * src_unit + (Offset)d.row * src_row
                                              + (Offset)d.column * vec;
                    dst_offsets[u] = (Offset)d.unit * dst_unit + (Offset)d.row * dst_row + (Offset)d.column * vec;
                    KVXFER_ACCESS_HOOK(0, box_src + src_offset, sizeof(Vec));
                    values[u] = kvxfer_load(reinterpret_cast<const Vec*>(box_src + src_offset));
                }
                kvxfer_advance(d, step, row_vectors, unit_rows);
            }
#pragma unroll
            for (int u = 0; u < KVXFER_UNROLL; ++u) {
                if (first + u * group_size < num_vectors) {
                    KVXFER_ACCESS_HOOK(1, box_dst + dst_offsets[u], sizeof(Vec));
                    kvxfer_store(reinterpret_cast<Vec*>(box_dst + dst_offsets[u]), values[u]);
                }
            }
        }
    }
}

#define KVXFER_DEFINE_ENTRY(NAME, BODY)                                                                            \
    extern "C" __global__ void __launch_bounds__(KVXFER_THREADS, KVXFER_MIN_CTAS) NAME(                             \
        const char* __restrict__ src, char* __restrict__ dst, const long long* __restrict__ table,                  \
        int num_segments, int num_layer_parts, unsigned int seg_mul, unsigned int seg_shr, int unit_rows,           \
        int row_vectors, long long src_unit_stride, long long src_row_stride, long long dst_unit_stride,            \
        long long dst_row_stride, unsigned int row_mul, unsigned int row_shr, unsigned int rows_mul,                \
        unsigned int rows_shr, int group_shift) {                                                                   \
        const kvxfer_args a = {table, num_segments, num_layer_parts, seg_mul, seg_shr, unit_rows, row_vectors,      \
                               src_unit_stride, src_row_stride, dst_unit_stride, dst_row_stride, row_mul, row_shr,  \
                               rows_mul, rows_shr, group_shift};                                                    \
        BODY(src, dst, a);                                                                                          \
    }

#define KVXFER_DEFINE_WIDTH(W, VEC)                                                                                \
    KVXFER_DEFINE_ENTRY(kvxfer_run_v##W, kvxfer_copy_run<VEC>)                                                      \
    KVXFER_DEFINE_ENTRY(kvxfer_rows_v##W, (kvxfer_copy_rows<VEC, unsigned int>))                                    \
    KVXFER_DEFINE_ENTRY(kvxfer_rows_wide_v##W, (kvxfer_copy_rows<VEC, unsigned long long>))

KVXFER_DEFINE_WIDTH(1, unsigned char)
KVXFER_DEFINE_WIDTH(2, unsigned short)
KVXFER_DEFINE_WIDTH(4, unsigned int)
KVXFER_DEFINE_WIDTH(8, kvxfer_vec8)
KVXFER_DEFINE_WIDTH(16, kvxfer_vec16)
