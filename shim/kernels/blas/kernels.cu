// blas: a tiled single-precision GEMM. Row-major, C = A @ B with A MxK, B KxN, C MxN.
// Blocks are 16x16 threads; each block walks the output tiles in a grid-stride loop, so any grid
// computes the whole product (a small grid just loops more).
#define TILE 16

extern "C" __global__ void sgemm(int M, int N, int K, const float* __restrict__ A,
                                 const float* __restrict__ B, float* __restrict__ C) {
    __shared__ float As[TILE][TILE + 1];
    __shared__ float Bs[TILE][TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    // the loop bounds depend on blockIdx alone: every thread of a block reaches each __syncthreads
    for (int tileRow = blockIdx.y; tileRow * TILE < M; tileRow += gridDim.y) {
        for (int tileCol = blockIdx.x; tileCol * TILE < N; tileCol += gridDim.x) {
            const int row = tileRow * TILE + ty, col = tileCol * TILE + tx;
            float acc = 0.0f;
            for (int t = 0; t < K; t += TILE) {
                As[ty][tx] = (row < M && t + tx < K) ? A[(size_t)row * K + t + tx] : 0.0f;
                Bs[ty][tx] = (t + ty < K && col < N) ? B[(size_t)(t + ty) * N + col] : 0.0f;
                __syncthreads();
#pragma unroll
                for (int k = 0; k < TILE; ++k) acc += As[ty][k] * Bs[k][tx];
                __syncthreads();
            }
            if (row < M && col < N) C[(size_t)row * N + col] = acc;
        }
    }
}
