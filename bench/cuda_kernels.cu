// Microbenchmarks of the CUDA kernels in cuda/kernels.h, next to the device's peak and the
// library equivalent where one exists (cuDNN softmax, cuBLAS GEMM, a cuBLAS + softmax attention).
//
// Method: each case runs 3 warm-up calls, then 20 timed calls; before each timed call a buffer of
// max(64 MB, 2 x L2) is written with cudaMemsetAsync so the inputs start in HBM, not L2 (the
// memset is queued before the start event, so it also hides the host's launch overhead).
// Each call is timed with CUDA events around it alone; the table reports the median.
// Effective bandwidth counts the bytes the op must move at least once (inputs read + outputs
// written); compute-bound ops report TFLOP/s of the useful math (2 flops per multiply-add).
//
// cuDNN is loaded at run time (dlopen "libcudnn.so.9"), so the binary runs where cuDNN is
// missing; its column then says n/a.
//
// Usage: bench_cuda [filter]   (runs the cases whose name contains `filter`)
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda/check.h"
#include "cuda/kernels.h"
#include "engine/random.h"
#include "engine/tensor.h"

using namespace mv;

namespace {

// ---- device facts ---------------------------------------------------------------------------

struct DeviceInfo {
  std::string name;
  int sms = 0;
  size_t l2 = 0;
  double peak_gbs = 0;     // HBM: memory clock x 2 (DDR) x bus width
  double peak_fp32 = 0;    // TFLOP/s: SMs x 128 FP32 lanes x 2 x SM clock (Hopper)
};

DeviceInfo device_info() {
  DeviceInfo d;
  int dev = 0, mem_khz = 0, bus_bits = 0, sm_khz = 0, l2 = 0;
  MV_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp p;
  MV_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  d.name = p.name;
  // CUDA 13 removed the clock fields from cudaDeviceProp; the attributes remain.
  MV_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  MV_CUDA_CHECK(cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, dev));
  MV_CUDA_CHECK(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev));
  MV_CUDA_CHECK(cudaDeviceGetAttribute(&sm_khz, cudaDevAttrClockRate, dev));
  MV_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  d.l2 = size_t(l2);
  d.peak_gbs = double(mem_khz) * 1e3 * 2.0 * double(bus_bits) / 8.0 / 1e9;
  d.peak_fp32 = double(d.sms) * 128 * 2 * double(sm_khz) * 1e3 / 1e12;
  return d;
}

// ---- timing ---------------------------------------------------------------------------------

struct Timing {
  void* flush = nullptr;
  size_t flush_bytes = 0;
  cudaEvent_t start, stop;

  explicit Timing(size_t l2) {
    flush_bytes = std::max<size_t>(size_t(64) << 20, 2 * l2);
    MV_CUDA_CHECK(cudaMalloc(&flush, flush_bytes));
    MV_CUDA_CHECK(cudaEventCreate(&start));
    MV_CUDA_CHECK(cudaEventCreate(&stop));
  }

  // Median milliseconds of f over `reps` calls, L2 flushed before each.
  double median_ms(const std::function<void()>& f, int reps = 20, int warmup = 3) {
    for (int i = 0; i < warmup; ++i) f();
    MV_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> ms;
    for (int r = 0; r < reps; ++r) {
      MV_CUDA_CHECK(cudaMemsetAsync(flush, r & 0xff, flush_bytes, 0));
      MV_CUDA_CHECK(cudaEventRecord(start, 0));
      f();
      MV_CUDA_CHECK(cudaEventRecord(stop, 0));
      MV_CUDA_CHECK(cudaEventSynchronize(stop));
      float t = 0;
      MV_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return 0.5 * (ms[(ms.size() - 1) / 2] + ms[ms.size() / 2]);
  }
};

// ---- cuDNN, loaded at run time --------------------------------------------------------------

struct Cudnn {
  bool ok = false;
  cudnnHandle_t h = nullptr;
  decltype(&cudnnCreate) create = nullptr;
  decltype(&cudnnCreateTensorDescriptor) create_desc = nullptr;
  decltype(&cudnnSetTensor4dDescriptor) set4d = nullptr;
  decltype(&cudnnDestroyTensorDescriptor) destroy_desc = nullptr;
  decltype(&cudnnSoftmaxForward) softmax_fwd = nullptr;
  decltype(&cudnnSoftmaxBackward) softmax_bwd = nullptr;
  std::string why;

  Cudnn() {
    void* lib = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) lib = dlopen("libcudnn.so", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) {
      why = dlerror();
      return;
    }
    create = reinterpret_cast<decltype(create)>(dlsym(lib, "cudnnCreate"));
    create_desc = reinterpret_cast<decltype(create_desc)>(dlsym(lib, "cudnnCreateTensorDescriptor"));
    set4d = reinterpret_cast<decltype(set4d)>(dlsym(lib, "cudnnSetTensor4dDescriptor"));
    destroy_desc = reinterpret_cast<decltype(destroy_desc)>(dlsym(lib, "cudnnDestroyTensorDescriptor"));
    softmax_fwd = reinterpret_cast<decltype(softmax_fwd)>(dlsym(lib, "cudnnSoftmaxForward"));
    softmax_bwd = reinterpret_cast<decltype(softmax_bwd)>(dlsym(lib, "cudnnSoftmaxBackward"));
    if (!create || !create_desc || !set4d || !destroy_desc || !softmax_fwd || !softmax_bwd) {
      why = "missing symbols";
      return;
    }
    if (create(&h) != CUDNN_STATUS_SUCCESS) {
      why = "cudnnCreate failed";
      return;
    }
    ok = true;
  }

  // A (R, C, 1, 1) NCHW descriptor: INSTANCE mode normalises over C*H*W = C per row.
  cudnnTensorDescriptor_t rows(int R, int C) {
    cudnnTensorDescriptor_t d;
    create_desc(&d);
    set4d(d, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, R, C, 1, 1);
    return d;
  }
};

// ---- output ---------------------------------------------------------------------------------

void header(const char* title, const char* unit, const char* ref) {
  std::printf("\n== %s\n", title);
  std::printf("%-34s %10s %10s %7s %12s %8s\n", "shape", "ours ms", unit, "%peak", ref, "speedup");
}

// rate: GB/s or TFLOP/s of ours; ref_ms < 0: no reference.
void row(const std::string& shape, double ms, double rate, double peak, double ref_ms) {
  std::printf("%-34s %10.4f %10.1f %6.1f%% ", shape.c_str(), ms, rate, 100.0 * rate / peak);
  if (ref_ms > 0) std::printf("%12.4f %7.2fx\n", ref_ms, ref_ms / ms);
  else std::printf("%12s %8s\n", "n/a", "");
}

Tensor randn_dev(const Shape& s, uint64_t seed, float scale = 1.f) {
  Tensor t = cuda::philox_normal(s, seed, 0);
  if (scale != 1.f) t = cuda::axpby(t, Tensor(), scale, 0.f);
  return t;
}

std::string fmt(const char* f, long a, long b, long c = -1, long d = -1) {
  char buf[128];
  std::snprintf(buf, sizeof buf, f, a, b, c, d);
  return buf;
}

bool want(const char* filter, const char* name) { return !filter || std::strstr(name, filter); }

// ---- cuBLAS + softmax attention: the baseline the flash kernel should beat ------------------
// Per head h (H calls, each strided-batched over B): S = scale * K Q^T in column-major terms
// (i.e. row-major S = scale * Q K^T, T x T per (b, h)), then one softmax over all H*B*T rows, then
// O = P V written straight into the packed (B, T, D) output. Materialises the H*B*T*T matrix.
struct BlasAttention {
  cublasHandle_t h;
  BlasAttention() {
    MV_CUBLAS_CHECK(cublasCreate(&h));
    MV_CUBLAS_CHECK(cublasSetStream(h, 0));
  }
  Tensor forward(const Tensor& qkv, int H, bool tf32) {
    const int B = int(qkv.size(0)), T = int(qkv.size(1)), D = int(qkv.size(2) / 3), Dh = D / H;
    Tensor S = Tensor::empty({int64_t(H) * B * T, T}, DType::F32, Device::CUDA);
    Tensor out = Tensor::empty({B, T, D}, DType::F32, Device::CUDA);
    const float scale = 1.f / std::sqrt(float(Dh)), zero = 0.f, one = 1.f;
    const cublasComputeType_t ct = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const float* q = qkv.data<float>();
    const long long sq = (long long)T * 3 * D, ss = (long long)T * T;
    for (int hh = 0; hh < H; ++hh)
      MV_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, T, T, Dh, &scale,
                                                 q + D + hh * Dh, CUDA_R_32F, 3 * D, sq, q + hh * Dh, CUDA_R_32F,
                                                 3 * D, sq, &zero, S.data<float>() + int64_t(hh) * B * T * T,
                                                 CUDA_R_32F, T, ss, B, ct, CUBLAS_GEMM_DEFAULT));
    Tensor P = cuda::softmax_forward(S);
    for (int hh = 0; hh < H; ++hh)
      MV_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, Dh, T, T, &one, q + 2 * D + hh * Dh,
                                                 CUDA_R_32F, 3 * D, sq, P.data<float>() + int64_t(hh) * B * T * T,
                                                 CUDA_R_32F, T, ss, &zero, out.data<float>() + hh * Dh, CUDA_R_32F,
                                                 D, (long long)T * D, B, ct, CUBLAS_GEMM_DEFAULT));
    return out;
  }
};

double max_diff(const Tensor& a, const Tensor& b) {
  std::vector<float> x = a.to_vector<float>(), y = b.to_vector<float>();
  double m = 0;
  for (size_t i = 0; i < x.size(); ++i) m = std::max(m, double(std::fabs(x[i] - y[i])));
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda_available()) {
    std::printf("bench_cuda: no CUDA device\n");
    return 77;
  }
  const char* filter = argc > 1 ? argv[1] : nullptr;
  const DeviceInfo dev = device_info();
  Timing timing(dev.l2);
  Cudnn dnn;
  std::printf("device: %s, %d SMs, L2 %.0f MB, peak HBM %.0f GB/s, peak FP32 (non-tensor) %.1f TFLOP/s\n",
              dev.name.c_str(), dev.sms, dev.l2 / 1e6, dev.peak_gbs, dev.peak_fp32);
  std::printf("timing: median of 20 after 3 warm-ups, CUDA events, L2 flushed (%.0f MB memset) before each call\n",
              timing.flush_bytes / 1e6);
  std::printf("cuDNN: %s\n", dnn.ok ? "loaded" : ("not available (" + dnn.why + ")").c_str());
  const double GB = 1e9;

  auto guarded = [](const char* what, const std::function<void()>& f) {
    try {
      f();
    } catch (const std::exception& e) {
      std::printf("%s: FAILED: %s\n", what, e.what());
    }
  };

  const std::vector<int64_t> rows = {128 * 50, 128 * 65};
  const std::vector<int64_t> widths = {64, 192, 1000, 4096};

  if (want(filter, "softmax")) guarded("softmax", [&] {
    header("softmax forward (last axis)", "GB/s", "cuDNN ms");
    for (int64_t R : rows)
      for (int64_t C : widths) {
        Tensor x = randn_dev({R, C}, 1, 3.f);
        const double ms = timing.median_ms([&] { cuda::softmax_forward(x); });
        double ref = -1;
        if (dnn.ok) {
          Tensor y = Tensor::empty({R, C}, DType::F32, Device::CUDA);
          cudnnTensorDescriptor_t d = dnn.rows(int(R), int(C));
          const float one = 1.f, zero = 0.f;
          ref = timing.median_ms([&] {
            dnn.softmax_fwd(dnn.h, CUDNN_SOFTMAX_ACCURATE, CUDNN_SOFTMAX_MODE_INSTANCE, &one, d, x.raw(), &zero, d, y.raw());
          });
          std::printf("  (cuDNN vs ours max |diff| %.2e)\n", max_diff(y, cuda::softmax_forward(x)));
          dnn.destroy_desc(d);
        }
        const double gbs = 2.0 * R * C * 4 / (ms * 1e-3) / GB;
        row(fmt("R=%ld C=%ld", R, C), ms, gbs, dev.peak_gbs, ref);
      }
    header("softmax backward", "GB/s", "cuDNN ms");
    for (int64_t R : rows)
      for (int64_t C : widths) {
        Tensor y = cuda::softmax_forward(randn_dev({R, C}, 2, 3.f)), dy = randn_dev({R, C}, 3);
        const double ms = timing.median_ms([&] { cuda::softmax_backward(y, dy); });
        double ref = -1;
        if (dnn.ok) {
          Tensor dx = Tensor::empty({R, C}, DType::F32, Device::CUDA);
          cudnnTensorDescriptor_t d = dnn.rows(int(R), int(C));
          const float one = 1.f, zero = 0.f;
          ref = timing.median_ms([&] {
            dnn.softmax_bwd(dnn.h, CUDNN_SOFTMAX_ACCURATE, CUDNN_SOFTMAX_MODE_INSTANCE, &one, d, y.raw(), d, dy.raw(),
                            &zero, d, dx.raw());
          });
          dnn.destroy_desc(d);
        }
        row(fmt("R=%ld C=%ld", R, C), ms, 3.0 * R * C * 4 / (ms * 1e-3) / GB, dev.peak_gbs, ref);
      }
  });

  if (want(filter, "layernorm")) guarded("layernorm", [&] {
    header("layernorm forward", "GB/s", "");
    for (int64_t R : rows)
      for (int64_t D : widths) {
        Tensor x = randn_dev({R, D}, 4), g = randn_dev({D}, 5), b = randn_dev({D}, 6);
        const double ms = timing.median_ms([&] { cuda::layernorm_forward(x, g, b, 1e-6f); });
        row(fmt("R=%ld D=%ld", R, D), ms, (2.0 * R * D + 2.0 * R) * 4 / (ms * 1e-3) / GB, dev.peak_gbs, -1);
      }
    header("layernorm backward (dx, dgamma, dbeta; deterministic)", "GB/s", "");
    for (int64_t R : rows)
      for (int64_t D : widths) {
        Tensor x = randn_dev({R, D}, 4), g = randn_dev({D}, 5), b = randn_dev({D}, 6), dy = randn_dev({R, D}, 7);
        auto f = cuda::layernorm_forward(x, g, b, 1e-6f);
        const double ms = timing.median_ms([&] { cuda::layernorm_backward(dy, x, g, f.mean, f.rstd); });
        row(fmt("R=%ld D=%ld", R, D), ms, (3.0 * R * D + 2.0 * R) * 4 / (ms * 1e-3) / GB, dev.peak_gbs, -1);
      }
  });

  if (want(filter, "cross_entropy")) guarded("cross_entropy", [&] {
    header("cross-entropy forward / backward (label smoothing 0.1)", "GB/s", "");
    for (auto [N, C] : std::vector<std::pair<int64_t, int64_t>>{{1024, 1000}, {8192, 1000}, {8192, 10}, {512, 32000}}) {
      Tensor x = randn_dev({N, C}, 8, 2.f);
      std::vector<int64_t> lab(static_cast<size_t>(N));
      for (int64_t i = 0; i < N; ++i) lab[size_t(i)] = (i * 31) % C;
      Tensor y = Tensor::from_i64(lab, {N}).to(Device::CUDA);
      const double fms = timing.median_ms([&] { cuda::cross_entropy_forward(x, y, 0.1f); });
      row(fmt("fwd N=%ld C=%ld", N, C), fms, double(N) * C * 4 / (fms * 1e-3) / GB, dev.peak_gbs, -1);
      auto f = cuda::cross_entropy_forward(x, y, 0.1f);
      const double bms = timing.median_ms([&] { cuda::cross_entropy_backward(x, y, f.lse, 0.1f); });
      row(fmt("bwd N=%ld C=%ld", N, C), bms, 2.0 * N * C * 4 / (bms * 1e-3) / GB, dev.peak_gbs, -1);
    }
  });

  if (want(filter, "elementwise")) guarded("elementwise", [&] {
    header("elementwise (R=8320 x C=768, the MLP hidden of D=192)", "GB/s", "");
    const int64_t R = 128 * 65, C = 768, n = R * C;
    Tensor a = randn_dev({R, C}, 9), b = randn_dev({R, C}, 10), bias = randn_dev({C}, 11);
    double ms = timing.median_ms([&] { cuda::gelu_forward(a); });
    row("gelu forward", ms, 2.0 * n * 4 / (ms * 1e-3) / GB, dev.peak_gbs, -1);
    ms = timing.median_ms([&] { cuda::gelu_backward(a, b); });
    row("gelu backward", ms, 3.0 * n * 4 / (ms * 1e-3) / GB, dev.peak_gbs, -1);
    ms = timing.median_ms([&] { cuda::binary(a, b, ops::Binary::Add); });
    row("add", ms, 3.0 * n * 4 / (ms * 1e-3) / GB, dev.peak_gbs, -1);
    ms = timing.median_ms([&] { cuda::binary(a, b, ops::Binary::Mul); });
    row("mul", ms, 3.0 * n * 4 / (ms * 1e-3) / GB, dev.peak_gbs, -1);
    const Tensor row_b = bias.view_as({1, C}, {C, 1}, 0);
    ms = timing.median_ms([&] { cuda::binary(a, row_b, ops::Binary::Mul); });
    row("mul, (1, C) broadcast (index walk)", ms, 2.0 * n * 4 / (ms * 1e-3) / GB, dev.peak_gbs, -1);
    ms = timing.median_ms([&] { cuda::unary_forward(a, ops::Unary::Exp); });
    row("exp (unary map)", ms, 2.0 * n * 4 / (ms * 1e-3) / GB, dev.peak_gbs, -1);
    ms = timing.median_ms([&] { cuda::add_bias(a, bias); });
    row("add_bias", ms, 2.0 * n * 4 / (ms * 1e-3) / GB, dev.peak_gbs, -1);
  });

  if (want(filter, "adamw")) guarded("adamw", [&] {
    header("adamw_step (one multi-tensor launch)", "GB/s", "");
    // A ViT-S-like parameter list: 12 blocks of (qkv, proj, fc1, fc2 weights + biases + 2 LN) + extras.
    std::vector<int64_t> sizes;
    const int64_t D = 384;
    for (int blk = 0; blk < 12; ++blk)
      for (int64_t s : {D * 3 * D, 3 * D, D * D, D, D * 4 * D, 4 * D, 4 * D * D, D, D, D, D, D}) sizes.push_back(s);
    for (int64_t s : {int64_t(768) * D, D, D, D * 1000, int64_t(1000)}) sizes.push_back(s);
    std::vector<Tensor> p, g, m, v;
    std::vector<float> wd;
    int64_t total = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      p.push_back(randn_dev({sizes[i]}, 100 + i));
      g.push_back(randn_dev({sizes[i]}, 200 + i));
      m.push_back(Tensor::zeros({sizes[i]}, DType::F32, Device::CUDA));
      v.push_back(Tensor::zeros({sizes[i]}, DType::F32, Device::CUDA));
      wd.push_back(sizes[i] > 4 * D ? 0.05f : 0.f);
      total += sizes[i];
    }
    int64_t step = 1;
    const double ms = timing.median_ms([&] { cuda::adamw_step(p, g, m, v, 1e-3f, 0.9f, 0.999f, 1e-8f, wd, step++); });
    row(fmt("%ld tensors, %ld params", long(sizes.size()), total), ms, 7.0 * total * 4 / (ms * 1e-3) / GB, dev.peak_gbs, -1);
  });

  if (want(filter, "philox")) guarded("philox", [&] {
    header("philox (write-only)", "GB/s", "");
    const int64_t n = int64_t(1) << 24;
    double ms = timing.median_ms([&] { cuda::philox_uniform({n}, 1, 0); });
    row("uniform n=2^24", ms, 4.0 * n / (ms * 1e-3) / GB, dev.peak_gbs, -1);
    ms = timing.median_ms([&] { cuda::philox_normal({n}, 1, 0); });
    row("normal n=2^24", ms, 4.0 * n / (ms * 1e-3) / GB, dev.peak_gbs, -1);
  });

  if (want(filter, "matmul")) guarded("matmul", [&] {
    header("linear_forward = cuBLASLt with fused bias, vs cuBLAS GEMM + add_bias kernel", "TFLOP/s", "GEMM+bias");
    const int64_t R = 128 * 65;
    for (bool tf32 : {false, true})
      for (auto [IN, OUT] : std::vector<std::pair<int64_t, int64_t>>{{192, 576}, {192, 768}, {768, 192}, {384, 1536}}) {
        Tensor x = randn_dev({R, IN}, 12), w = randn_dev({IN, OUT}, 13, 0.05f), b = randn_dev({OUT}, 14);
        const double ms = timing.median_ms([&] { cuda::linear_forward(x, w, b, tf32); });
        const double ref = timing.median_ms([&] { cuda::add_bias(cuda::matmul(x, w, tf32), b); });
        const double peak = tf32 ? 494.0 : dev.peak_fp32;  // H100 SXM dense TF32 (datasheet) vs FP32 lanes
        row(fmt(tf32 ? "TF32 R=%ld in=%ld out=%ld" : "FP32 R=%ld in=%ld out=%ld", R, IN, OUT), ms,
            2.0 * R * IN * OUT / (ms * 1e-3) / 1e12, peak, ref);
      }
    header("matmul: batched (B, M, K) x (B, K, N), cuBLAS strided-batched", "TFLOP/s", "");
    for (bool tf32 : {false, true}) {
      const int64_t B = 64, M = 197, K = 64, N = 197;
      Tensor a = randn_dev({B, M, K}, 15), bb = randn_dev({B, K, N}, 16);
      const double ms = timing.median_ms([&] { cuda::matmul(a, bb, tf32); });
      row(fmt(tf32 ? "TF32 B=%ld M=%ld K=%ld N=%ld" : "FP32 B=%ld M=%ld K=%ld N=%ld", B, M, K, N), ms,
          2.0 * B * M * K * N / (ms * 1e-3) / 1e12, tf32 ? 494.0 : dev.peak_fp32, -1);
    }
  });

  if (want(filter, "attention")) guarded("attention", [&] {
    BlasAttention blas;
    header("attention forward (flash, FP32) vs cuBLAS FP32 batched GEMMs + softmax", "TFLOP/s", "cuBLAS ms");
    struct C {
      int64_t T, D, H;
    };
    const std::vector<C> cases = {{50, 64, 4}, {65, 64, 4}, {197, 64, 4}, {50, 192, 3}, {65, 192, 3}, {197, 192, 3}};
    const int64_t B = 128;
    for (const C& c : cases) {
      Tensor qkv = randn_dev({B, c.T, 3 * c.D}, 17);
      const double ms = timing.median_ms([&] { cuda::attention_forward(qkv, int(c.H)); });
      const double ref = timing.median_ms([&] { blas.forward(qkv, int(c.H), false); });
      const double flops = 4.0 * B * c.T * c.T * c.D;  // QK^T and PV, all heads
      row(fmt("B=%ld T=%ld D=%ld H=%ld", B, c.T, c.D, c.H), ms, flops / (ms * 1e-3) / 1e12, dev.peak_fp32, ref);
      std::printf("  (flash vs cuBLAS max |diff| %.2e; cuBLAS TF32 ms %.4f)\n",
                  max_diff(cuda::attention_forward(qkv, int(c.H)).out, blas.forward(qkv, int(c.H), false)),
                  timing.median_ms([&] { blas.forward(qkv, int(c.H), true); }));
    }
    header("attention backward (flash, FP32, deterministic; FLOPs counted as 2.5x forward)", "TFLOP/s", "");
    for (const C& c : cases) {
      Tensor qkv = randn_dev({B, c.T, 3 * c.D}, 17), dout = randn_dev({B, c.T, c.D}, 18);
      auto f = cuda::attention_forward(qkv, int(c.H));
      const double ms = timing.median_ms([&] { cuda::attention_backward(qkv, f.out, f.saved, dout, int(c.H)); });
      const double flops = 2.5 * 4.0 * B * c.T * c.T * c.D;
      row(fmt("B=%ld T=%ld D=%ld H=%ld", B, c.T, c.D, c.H), ms, flops / (ms * 1e-3) / 1e12, dev.peak_fp32, -1);
    }
  });
  cuda::synchronize();
  return 0;
}
