// jacobi: one Jacobi iteration step for A x = b (A row-major NxN, float32), and the residual.
// One warp per row (coalesced reads of A), rows in a grid-stride loop: any grid covers every row.
// blockDim.x must be a multiple of 32.

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// x_new[i] = (b[i] - sum_{j != i} A[i][j] x[j]) / A[i][i]
extern "C" __global__ void jacobi_step(int N, const float* __restrict__ A, const float* __restrict__ b,
                                       const float* __restrict__ x, float* __restrict__ x_new) {
    const int lane = threadIdx.x & 31;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    for (int i = warp; i < N; i += warps) {
        const float* row = A + (size_t)i * N;
        float sigma = 0.0f;
        for (int j = lane; j < N; j += 32) sigma += (j != i) ? row[j] * x[j] : 0.0f;
        sigma = warp_sum(sigma);
        if (lane == 0) x_new[i] = (b[i] - sigma) / row[i];
    }
}

// r = b - A x
extern "C" __global__ void residual(int N, const float* __restrict__ A, const float* __restrict__ b,
                                    const float* __restrict__ x, float* __restrict__ r) {
    const int lane = threadIdx.x & 31;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    for (int i = warp; i < N; i += warps) {
        const float* row = A + (size_t)i * N;
        float s = 0.0f;
        for (int j = lane; j < N; j += 32) s += row[j] * x[j];
        s = warp_sum(s);
        if (lane == 0) r[i] = b[i] - s;
    }
}
