// elementwise: float32 vector kernels over n elements, grid-stride loops (any grid covers n).
#define FOR_EACH(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// y = alpha * x + y
extern "C" __global__ void axpy(unsigned long long n, float alpha, const float* __restrict__ x,
                                float* __restrict__ y) {
    FOR_EACH(i, n) y[i] = alpha * x[i] + y[i];
}

// y = alpha * x
extern "C" __global__ void scale(unsigned long long n, float alpha, const float* __restrict__ x,
                                 float* __restrict__ y) {
    FOR_EACH(i, n) y[i] = alpha * x[i];
}

// y = max(x, 0)
extern "C" __global__ void relu(unsigned long long n, const float* __restrict__ x, float* __restrict__ y) {
    FOR_EACH(i, n) y[i] = fmaxf(x[i], 0.0f);
}

// z = x + y
extern "C" __global__ void add(unsigned long long n, const float* __restrict__ x, const float* __restrict__ y,
                               float* __restrict__ z) {
    FOR_EACH(i, n) z[i] = x[i] + y[i];
}

// z = x * y
extern "C" __global__ void mul(unsigned long long n, const float* __restrict__ x, const float* __restrict__ y,
                               float* __restrict__ z) {
    FOR_EACH(i, n) z[i] = x[i] * y[i];
}

// y = value
extern "C" __global__ void fill(unsigned long long n, float value, float* __restrict__ y) {
    FOR_EACH(i, n) y[i] = value;
}

// y = x
extern "C" __global__ void copy(unsigned long long n, const float* __restrict__ x, float* __restrict__ y) {
    FOR_EACH(i, n) y[i] = x[i];
}
