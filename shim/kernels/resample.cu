// Pillow's fixed-point resampling passes over uint8 HWC images (resample.py is the numpy twin and
// computes the coefficients: bounds [out, 2] = (first input pixel, count), weights [out, ksize]
// with PRECISION_BITS = 22). Each pass rounds to uint8 as Pillow does; the last pass of an image
// also writes (x - mean) / std as float32 CHW into its slot of the batch (fdst != nullptr).
// blockIdx.y picks one of several images of the same size laid end to end: image b reads
// src + b * src_stride and writes dst + b * dst_stride (or fdst + b * fdst_stride), so one launch
// per pass serves all of them.

#define PRECISION_BITS 22

__device__ __forceinline__ unsigned char clip8(int in) {
    if (in >= (int)(256u << PRECISION_BITS)) return 255;
    if (in <= 0) return 0;
    return (unsigned char)(in >> PRECISION_BITS);
}

__device__ __forceinline__ void store(unsigned char v, int i, int x, int y, int c, int width, int height,
                                      unsigned char* dst, float* fdst, float mean, float std) {
    if (fdst) fdst[((size_t)c * height + y) * width + x] = ((float)v - mean) / std;
    else dst[i] = v;
}

// Horizontal: rows x out_w x channels outputs from input rows [row0, row0 + rows) of a src_w-wide image.
extern "C" __global__ void resample_h(const unsigned char* src, int src_w, int channels, int row0, int rows,
                                      const int* bounds, const int* weights, int ksize, int out_w,
                                      unsigned char* dst, float* fdst, float mean, float std,
                                      long long src_stride, long long dst_stride, long long fdst_stride) {
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= rows * out_w * channels) return;
    src += blockIdx.y * src_stride;
    if (fdst) fdst += blockIdx.y * fdst_stride; else dst += blockIdx.y * dst_stride;
    int c = i % channels, x = (i / channels) % out_w, y = i / (channels * out_w);
    int xmin = bounds[2 * x], count = bounds[2 * x + 1];
    const unsigned char* line = src + ((size_t)(row0 + y) * src_w + xmin) * channels + c;
    const int* k = weights + x * ksize;
    int ss = 1 << (PRECISION_BITS - 1);
    for (int j = 0; j < count; j++) ss += (int)line[j * channels] * k[j];
    store(clip8(ss), i, x, y, c, out_w, rows, dst, fdst, mean, std);
}

// Vertical: out_h x width x channels outputs; bounds are rows of src.
extern "C" __global__ void resample_v(const unsigned char* src, int width, int channels,
                                      const int* bounds, const int* weights, int ksize, int out_h,
                                      unsigned char* dst, float* fdst, float mean, float std,
                                      long long src_stride, long long dst_stride, long long fdst_stride) {
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= out_h * width * channels) return;
    src += blockIdx.y * src_stride;
    if (fdst) fdst += blockIdx.y * fdst_stride; else dst += blockIdx.y * dst_stride;
    int c = i % channels, x = (i / channels) % width, y = i / (channels * width);
    int ymin = bounds[2 * y], count = bounds[2 * y + 1];
    const int* k = weights + y * ksize;
    const unsigned char* column = src + ((size_t)ymin * width + x) * channels + c;
    int ss = 1 << (PRECISION_BITS - 1);
    for (int j = 0; j < count; j++) ss += (int)column[(size_t)j * width * channels] * k[j];
    store(clip8(ss), i, x, y, c, width, out_h, dst, fdst, mean, std);
}
