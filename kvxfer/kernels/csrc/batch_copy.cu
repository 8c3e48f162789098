// Copy many (source, destination, nbytes) pieces in one launch. The host splits large spans into pieces of at
// most a few tens of KiB, so CTAs share the work evenly; each CTA copies pieces in a grid-stride loop.
// Pointers may be local, peer (NVLink) or IPC-mapped: the kernel only dereferences them.

extern "C" __global__ void __launch_bounds__(256)
kvxfer_batch_copy(const unsigned long long* __restrict__ sources,
                  const unsigned long long* __restrict__ destinations,
                  const unsigned long long* __restrict__ sizes, long long count) {
  for (long long piece = blockIdx.x; piece < count; piece += gridDim.x) {
    const char* source = reinterpret_cast<const char*>(sources[piece]);
    char* destination = reinterpret_cast<char*>(destinations[piece]);
    const unsigned long long nbytes = sizes[piece];
    const unsigned long long alignment =
        reinterpret_cast<unsigned long long>(source) | reinterpret_cast<unsigned long long>(destination) | nbytes;
    const unsigned int stride = blockDim.x;
    if ((alignment & 15) == 0) {
      const uint4* from = reinterpret_cast<const uint4*>(source);
      uint4* to = reinterpret_cast<uint4*>(destination);
      const unsigned long long vectors = nbytes >> 4;
      unsigned long long i = threadIdx.x;
      // Four independent 16-byte loads in flight per thread before the stores: latency hiding over NVLink.
      for (; i + 3 * stride < vectors; i += 4 * stride) {
        const uint4 a = from[i], b = from[i + stride], c = from[i + 2 * stride], d = from[i + 3 * stride];
        to[i] = a;
        to[i + stride] = b;
        to[i + 2 * stride] = c;
        to[i + 3 * stride] = d;
      }
      for (; i < vectors; i += stride) to[i] = from[i];
    } else if ((alignment & 7) == 0) {
      const unsigned long long* from = reinterpret_cast<const unsigned long long*>(source);
      unsigned long long* to = reinterpret_cast<unsigned long long*>(destination);
      for (unsigned long long i = threadIdx.x; i < (nbytes >> 3); i += stride) to[i] = from[i];
    } else {
      for (unsigned long long i = threadIdx.x; i < nbytes; i += stride) destination[i] = source[i];
    }
  }
}
