// The KV copy addressed from block ids: every box's source and destination offsets are derived here from the
// request's block ids, layer ids and the two specs' strides, all in one int64 buffer (kvxfer/kernels/id_copy.py:
// fill_buffer writes it; id_reference.py: derive_boxes is the NumPy reference of kvxfer_ids_box_of, line by line).
//
// Compiled after kv_copy.cu (the launcher concatenates the two sources; the host emulation includes both): it
// uses that file's vector types, loads, stores and digit carries (kvxfer_vec16, kvxfer_load, kvxfer_advance, ...).
//
// Buffer: header (enum below), then src block ids [num_src_ids], dst block ids [num_dst_ids], src layer ids
// [num_layers], dst layer ids [num_layers]. Box b is (layer-part b / num_segments, segment b % num_segments);
// segment s is piece s % pieces of the run of `small` tokens number s / pieces. A box is walked with the "full"
// shape when it holds full_count tokens, else with the "odd" shape (units = its token count). Entries:
//   kvxfer_ids_run_v{W}, kvxfer_ids_rows_v{W}   the full shape is one contiguous run / rows; offsets inside a box
//                                              are 32-bit (the host checked they fit)
//   kvxfer_ids_run_wide_v{W}, ..._rows_wide_v{W}  the same with 64-bit offsets inside a box
// Box offsets (block id x block stride) are always 64-bit. All counts are below 2**31 (checked on the host).

// CTAs per SM the compiler must fit: 4 x 256 threads leave 64 registers (at kv_copy.cu's 5, its 48 spill here:
// the box derivation adds to the copy's registers). 4 x 256 threads x 4 x 16-byte loads keep 64 KiB in flight per
// SM, well above what HBM needs.
#ifndef KVXFER_IDS_MIN_CTAS
#define KVXFER_IDS_MIN_CTAS 4
#endif

// Header fields, in id_copy.py's HEADER order (tests/kernels/test_id_copy_source.py compares the two lists).
enum kvxfer_ids_field {
    KVXFER_IDS_NUM_TOKENS,
    KVXFER_IDS_NUM_SRC_IDS,
    KVXFER_IDS_NUM_DST_IDS,
    KVXFER_IDS_NUM_LAYERS,
    KVXFER_IDS_NUM_SEGMENTS,
    KVXFER_IDS_NUM_PARTS,
    KVXFER_IDS_PIECES,
    KVXFER_IDS_MOST,
    KVXFER_IDS_SMALL,
    KVXFER_IDS_SRC_BLOCK_SIZE,
    KVXFER_IDS_DST_BLOCK_SIZE,
    KVXFER_IDS_SRC_LAYER_STRIDE,
    KVXFER_IDS_SRC_BLOCK_STRIDE,
    KVXFER_IDS_SRC_PART_STRIDE,
    KVXFER_IDS_SRC_TOKEN_STRIDE,
    KVXFER_IDS_DST_LAYER_STRIDE,
    KVXFER_IDS_DST_BLOCK_STRIDE,
    KVXFER_IDS_DST_PART_STRIDE,
    KVXFER_IDS_DST_TOKEN_STRIDE,
    KVXFER_IDS_FULL_COUNT,
    KVXFER_IDS_FULL_UNITS,
    KVXFER_IDS_FULL_UNIT_ROWS,
    KVXFER_IDS_FULL_ROW_VECTORS,
    KVXFER_IDS_FULL_SRC_UNIT,
    KVXFER_IDS_FULL_SRC_ROW,
    KVXFER_IDS_FULL_DST_UNIT,
    KVXFER_IDS_FULL_DST_ROW,
    KVXFER_IDS_FULL_CONTIGUOUS,
    KVXFER_IDS_ODD_UNITS,
    KVXFER_IDS_ODD_UNIT_ROWS,
    KVXFER_IDS_ODD_ROW_VECTORS,
    KVXFER_IDS_ODD_SRC_UNIT,
    KVXFER_IDS_ODD_SRC_ROW,
    KVXFER_IDS_ODD_DST_UNIT,
    KVXFER_IDS_ODD_DST_ROW,
    KVXFER_IDS_ODD_CONTIGUOUS,
    KVXFER_IDS_GROUP_SHIFT,
    KVXFER_IDS_HEADER_LEN
};

// One header or id entry (read-only for the kernel's life: the buffer is uploaded before the launch).
__device__ __forceinline__ long long kvxfer_ids_read(const long long* __restrict__ p) { return *p; }

__device__ __forceinline__ long long kvxfer_ids_get(const long long* h, int field) {
    return kvxfer_ids_read(h + field);
}

// How boxes of one kind are walked: `units` units (0: the box's token count) x `unit_rows` rows x `row_vectors`
// vectors; strides in bytes. `contiguous`: the box is one run on both sides (unit_rows 1, unit strides = row).
struct kvxfer_ids_shape {
    unsigned int units, unit_rows, row_vectors;
    long long src_unit, src_row, dst_unit, dst_row;
    bool contiguous;
};

__device__ __forceinline__ kvxfer_ids_shape kvxfer_ids_read_shape(const long long* h, int first) {
    kvxfer_ids_shape s;
    s.units = (unsigned int)kvxfer_ids_get(h, first);
    s.unit_rows = (unsigned int)kvxfer_ids_get(h, first + 1);
    s.row_vectors = (unsigned int)kvxfer_ids_get(h, first + 2);
    s.src_unit = kvxfer_ids_get(h, first + 3);
    s.src_row = kvxfer_ids_get(h, first + 4);
    s.dst_unit = kvxfer_ids_get(h, first + 5);
    s.dst_row = kvxfer_ids_get(h, first + 6);
    s.contiguous = kvxfer_ids_get(h, first + 7) != 0;
    return s;
}

// A vector index of a box as digits (unit, row, column) of a shape (plain divisions: once per thread and shape).
__device__ __forceinline__ kvxfer_digits kvxfer_ids_split(unsigned int v, const kvxfer_ids_shape& s) {
    const unsigned int rows = v / s.row_vectors;
    kvxfer_digits d;
    d.column = v - rows * s.row_vectors;
    d.unit = rows / s.unit_rows;
    d.row = rows - d.unit * s.unit_rows;
    return d;
}

__device__ __forceinline__ unsigned int kvxfer_ids_min(unsigned int a, unsigned int b) { return a < b ? a : b; }

// One box: where it starts on each side (bytes from the base pointers) and its tokens (0: empty segment).
struct kvxfer_ids_box {
    long long src, dst;
    unsigned int count;
};

// The reference is id_reference.derive_boxes: the same steps, vectorized over boxes.
__device__ __forceinline__ kvxfer_ids_box kvxfer_ids_box_of(const long long* h, unsigned int box) {
    const unsigned int num_tokens = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_NUM_TOKENS);
    const unsigned int num_src_ids = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_NUM_SRC_IDS);
    const unsigned int num_dst_ids = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_NUM_DST_IDS);
    const unsigned int num_layers = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_NUM_LAYERS);
    const unsigned int num_segments = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_NUM_SEGMENTS);
    const unsigned int num_parts = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_NUM_PARTS);
    const unsigned int pieces = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_PIECES);
    const unsigned int most = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_MOST);
    const unsigned int small = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_SMALL);
    const long long* src_ids = h + KVXFER_IDS_HEADER_LEN;
    const long long* dst_ids = src_ids + num_src_ids;
    const long long* src_layers = dst_ids + num_dst_ids;
    const long long* dst_layers = src_layers + num_layers;

    const unsigned int layer_part = box / num_segments;
    const unsigned int segment = box - layer_part * num_segments;
    const unsigned int layer = layer_part / num_parts;
    const unsigned int part = layer_part - layer * num_parts;
    const unsigned int run = segment / pieces;
    const unsigned int piece = segment - run * pieces;
    const unsigned int start = run * small + piece * most;
    kvxfer_ids_box result;
    result.src = result.dst = 0;
    result.count = 0;
    if (start >= num_tokens) return result;
    result.count = kvxfer_ids_min(kvxfer_ids_min(most, small - piece * most), num_tokens - start);
    const unsigned int src_block_size = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_SRC_BLOCK_SIZE);
    const unsigned int src_block = start / src_block_size;
    const unsigned int src_slot = start - src_block * src_block_size;
    result.src = kvxfer_ids_read(src_layers + layer) * kvxfer_ids_get(h, KVXFER_IDS_SRC_LAYER_STRIDE)
                 + (long long)part * kvxfer_ids_get(h, KVXFER_IDS_SRC_PART_STRIDE)
                 + kvxfer_ids_read(src_ids + src_block) * kvxfer_ids_get(h, KVXFER_IDS_SRC_BLOCK_STRIDE)
                 + (long long)src_slot * kvxfer_ids_get(h, KVXFER_IDS_SRC_TOKEN_STRIDE);
    const unsigned int dst_block_size = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_DST_BLOCK_SIZE);
    const unsigned int dst_block = start / dst_block_size;
    const unsigned int dst_slot = start - dst_block * dst_block_size;
    result.dst = kvxfer_ids_read(dst_layers + layer) * kvxfer_ids_get(h, KVXFER_IDS_DST_LAYER_STRIDE)
                 + (long long)part * kvxfer_ids_get(h, KVXFER_IDS_DST_PART_STRIDE)
                 + kvxfer_ids_read(dst_ids + dst_block) * kvxfer_ids_get(h, KVXFER_IDS_DST_BLOCK_STRIDE)
                 + (long long)dst_slot * kvxfer_ids_get(h, KVXFER_IDS_DST_TOKEN_STRIDE);
    return result;
}

// A box that is one contiguous run on both sides: `num_vectors` vectors, KVXFER_UNROLL loads in flight per thread
// (kv_copy.cu's run body).
template <typename Vec>
__device__ __forceinline__ void kvxfer_ids_copy_run(const char* __restrict__ box_src, char* __restrict__ box_dst,
                                                    unsigned int num_vectors, unsigned int lane,
                                                    unsigned int group_size) {
    const Vec* src = reinterpret_cast<const Vec*>(box_src);
    Vec* dst = reinterpret_cast<Vec*>(box_dst);
    for (unsigned int first = lane; first < num_vectors; first += group_size * KVXFER_UNROLL) {
        Vec values[KVXFER_UNROLL];
#pragma unroll
        for (int u = 0; u < KVXFER_UNROLL; ++u) {
            const unsigned int v = first + u * group_size;
            if (v < num_vectors) {
                KVXFER_ACCESS_HOOK(0, src + v, sizeof(Vec));
                values[u] = kvxfer_load(src + v);
            }
        }
#pragma unroll
        for (int u = 0; u < KVXFER_UNROLL; ++u) {
            const unsigned int v = first + u * group_size;
            if (v < num_vectors) {
                KVXFER_ACCESS_HOOK(1, dst + v, sizeof(Vec));
                kvxfer_store(dst + v, values[u]);
            }
        }
    }
}

// A box of `units` units of shape `s` (kv_copy.cu's rows body): digits split once per box, stepped with carries.
// UNROLL loads in flight per thread (the full boxes), or 1 (a request's odd last box: fewer registers).
template <typename Vec, typename Offset, int UNROLL>
__device__ __forceinline__ void kvxfer_ids_copy_rows(const char* __restrict__ box_src, char* __restrict__ box_dst,
                                                     unsigned int units, const kvxfer_ids_shape& s,
                                                     unsigned int lane, unsigned int group_size) {
    const unsigned int num_vectors = units * s.unit_rows * s.row_vectors;
    const Offset src_unit = (Offset)s.src_unit, src_row = (Offset)s.src_row;
    const Offset dst_unit = (Offset)s.dst_unit, dst_row = (Offset)s.dst_row;
    const Offset vec = (Offset)sizeof(Vec);
    const kvxfer_digits step = kvxfer_ids_split(group_size, s);
    kvxfer_digits d = kvxfer_ids_split(lane, s);
    for (unsigned int first = lane; first < num_vectors; first += group_size * UNROLL) {
        Vec values[UNROLL];
        Offset dst_offsets[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (first + u * group_size < num_vectors) {
                const Offset src_offset = (Offset)d.unit * src_unit + (Offset)d.row * src_row + (Offset)d.column * vec;
                dst_offsets[u] = (Offset)d.unit * dst_unit + (Offset)d.row * dst_row + (Offset)d.column * vec;
                KVXFER_ACCESS_HOOK(0, box_src + src_offset, sizeof(Vec));
                values[u] = kvxfer_load(reinterpret_cast<const Vec*>(box_src + src_offset));
            }
            kvxfer_advance(d, step, s.row_vectors, s.unit_rows);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (first + u * group_size < num_vectors) {
                KVXFER_ACCESS_HOOK(1, box_dst + dst_offsets[u], sizeof(Vec));
                kvxfer_store(reinterpret_cast<Vec*>(box_dst + dst_offsets[u]), values[u]);
            }
        }
    }
}

// Groups of 2**group_shift threads; each copies one box at a time and strides over boxes by the grid's groups.
// RUN: the full shape is one contiguous run (the host picks the entry from the header's full_contiguous).
template <typename Vec, typename Offset, bool RUN>
__device__ __forceinline__ void kvxfer_ids_copy(const char* __restrict__ src, char* __restrict__ dst,
                                                const long long* __restrict__ h) {
    const unsigned int group_shift = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_GROUP_SHIFT);
    const unsigned int group_size = 1u << group_shift;
    const unsigned int lane = threadIdx.x & (group_size - 1u);
    const unsigned int groups_per_cta = blockDim.x >> group_shift;
    const unsigned int num_boxes = (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_NUM_SEGMENTS)
                                   * (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_NUM_LAYERS)
                                   * (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_NUM_PARTS);
    const unsigned int stride = gridDim.x * groups_per_cta;
    for (unsigned int box = blockIdx.x * groups_per_cta + (threadIdx.x >> group_shift); box < num_boxes;
         box += stride) {
        const kvxfer_ids_box b = kvxfer_ids_box_of(h, box);
        if (b.count == 0) continue;
        if (b.count == (unsigned int)kvxfer_ids_get(h, KVXFER_IDS_FULL_COUNT)) {  // the full shape
            const kvxfer_ids_shape full = kvxfer_ids_read_shape(h, KVXFER_IDS_FULL_UNITS);
            const unsigned int units = full.units ? full.units : b.count;
            if (RUN) {
                kvxfer_ids_copy_run<Vec>(src + b.src, dst + b.dst, units * full.row_vectors, lane, group_size);
            } else {
                kvxfer_ids_copy_rows<Vec, Offset, KVXFER_UNROLL>(src + b.src, dst + b.dst, units, full, lane,
                                                                 group_size);
            }
        } else {  // a request's last, partly filled block: the odd shape
            const kvxfer_ids_shape odd = kvxfer_ids_read_shape(h, KVXFER_IDS_ODD_UNITS);
            kvxfer_ids_copy_rows<Vec, Offset, 1>(src + b.src, dst + b.dst, odd.units ? odd.units : b.count, odd, lane,
                                                 group_size);
        }
    }
}

#define KVXFER_IDS_ENTRY(NAME, VEC, OFFSET, RUN)                                                                   \
    extern "C" __global__ void __launch_bounds__(KVXFER_THREADS, KVXFER_IDS_MIN_CTAS)                               \
        NAME(const char* __restrict__ src, char* __restrict__ dst, const long long* __restrict__ buffer) {          \
        kvxfer_ids_copy<VEC, OFFSET, RUN>(src, dst, buffer);                                                        \
    }

#define KVXFER_IDS_WIDTH(W, VEC)                                                                                   \
    KVXFER_IDS_ENTRY(kvxfer_ids_run_v##W, VEC, unsigned int, true)                                                  \
    KVXFER_IDS_ENTRY(kvxfer_ids_run_wide_v##W, VEC, unsigned long long, true)                                       \
    KVXFER_IDS_ENTRY(kvxfer_ids_rows_v##W, VEC, unsigned int, false)                                                \
    KVXFER_IDS_ENTRY(kvxfer_ids_rows_wide_v##W, VEC, unsigned long long, false)

KVXFER_IDS_WIDTH(1, unsigned char)
KVXFER_IDS_WIDTH(2, unsigned short)
KVXFER_IDS_WIDTH(4, unsigned int)
KVXFER_IDS_WIDTH(8, kvxfer_vec8)
KVXFER_IDS_WIDTH(16, kvxfer_vec16)
