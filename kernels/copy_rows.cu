// dst[r·dst_stride + c] = src[r·src_stride + c] for r < rows, c < row_bytes (all in bytes): a
// strided block of rows, such as the query heads of a fused QKV buffer to a dense [b, s, h, d]
// (cuDNN's attention needs evenly strided heads) and its gradient back. Block x copies rows
// [x·rows_per_block, ...) in units of `unit` bytes (16 when every row start and the row length
// are multiples of 16 bytes, else 1; the host decides): 32-bit index math only, since 64-bit
// divisions bound such passes. candle's copy2d (one element per thread) ran at ~0.9 TB/s.
#include "common.cuh"

template <typename U>
__device__ void copy_rows_impl(const unsigned char *src, unsigned char *dst, unsigned rows,
                               unsigned units, unsigned rows_per_block, size_t src_stride,
                               size_t dst_stride) {
    const unsigned r0 = blockIdx.x * rows_per_block;
    if (r0 >= rows) return;
    const unsigned n = min(rows_per_block, rows - r0) * units;
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
        const unsigned r = r0 + i / units, c = i % units;
        *reinterpret_cast<U *>(dst + r * dst_stride + c * sizeof(U)) =
            *reinterpret_cast<const U *>(src + r * src_stride + c * sizeof(U));
    }
}

extern "C" __global__ void copy_rows_16(const unsigned char *src, unsigned char *dst,
                                        unsigned rows, unsigned units, unsigned rows_per_block,
                                        unsigned long long src_stride,
                                        unsigned long long dst_stride) {
    copy_rows_impl<uint4>(src, dst, rows, units, rows_per_block, src_stride, dst_stride);
}

extern "C" __global__ void copy_rows_1(const unsigned char *src, unsigned char *dst,
                                       unsigned rows, unsigned units, unsigned rows_per_block,
                                       unsigned long long src_stride,
                                       unsigned long long dst_stride) {
    copy_rows_impl<unsigned char>(src, dst, rows, units, rows_per_block, src_stride, dst_stride);
}
