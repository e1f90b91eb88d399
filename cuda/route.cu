// Top-k token-choice routing on the GPU, the twins of ops/route.cpp's stages, and the
// probabilities of V-MoE's load loss.
//
// The routing is integer bookkeeping; each stage is a small kernel, and none uses atomics, so
// the result is the CPU's to the bit (the same rank keys, the same fill order):
//   topk_choices   a thread per token: k rounds of an argmax over the token's E rank keys,
//                  key = (order_bits(gate) << 32) | ~expert, so larger gates win and ties go to
//                  the lower expert (NaN as largest), as on the CPU;
//   fill_order     a thread per token: its place in its group's claim order, the number of
//                  tokens ahead of it (sequence order, or with BPR by best gate descending), so
//                  order[group, place] = token; O(N) per token, no sort;
//   assign_slots   a block per group, a thread per expert: every thread walks the group's choices
//                  in claim order, rank by rank, and numbers those of its own expert; a choice
//                  past C gets -1 (dropped). Each thread writes only its expert's choices;
//   place_choices  a thread per expert scans its counts over the groups (where each group's rows
//                  start), the table is cleared to unused rows, then a thread per choice writes
//                  its row; every row has one owner.
// The backward of the combine weights is a map over the tokens; the load-loss probabilities are
// a map over (token, expert) with Phi from ops/fast_math.h, the CPU's own polynomial.
//
// Expert choice ranks instead of sorting: a thread per (token, expert) counts the group's rank
// keys above its own in that expert's score column (O(N) per thread, O(G N^2 E) in all, small
// for per-image groups); rank r < C is row g*C + r of the expert, the place the CPU's sort of the
// same keys gives it. Every row and every token_rows entry has one writer.
//
// Expert indices and slots are not range-checked on the device: these kernels only read what
// the routing kernels wrote.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "ops/fast_math.h"

namespace mv::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

// The CPU's rank key (ops/route.cpp): larger first, ties to the lower index, NaN as largest;
// never 0, so 0 sorts below every real key.
__device__ __forceinline__ uint64_t rank_key(float v, int64_t i) {
  v = v != v ? INFINITY : v + 0.0f;
  const uint32_t u = __float_as_uint(v);
  const uint32_t bits = u ^ ((0u - (u >> 31)) | 0x80000000u);
  return (uint64_t(bits) << 32) | uint32_t(~uint32_t(i));
}
__device__ __forceinline__ int64_t key_index(uint64_t key) { return int64_t(~uint32_t(key)); }

__global__ void topk_choices_kernel(const float* gates, int64_t* expert, float* gate, int64_t tokens, int64_t E,
                                    int k) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < tokens; t += stride) {
    const float* row = gates + t * E;
    uint64_t last = ~uint64_t(0);  // keys are distinct: round r takes the largest below round r-1's
    for (int r = 0; r < k; ++r) {
      uint64_t best = 0;
      for (int64_t x = 0; x < E; ++x) {
        const uint64_t key = rank_key(row[x], x);
        if (key < last && key > best) best = key;
      }
      last = best;
      const int64_t bi = key_index(best);
      expert[t * k + r] = bi;
      gate[t * k + r] = row[bi];
    }
  }
}

__global__ void fill_order_kernel(const float* gate, int64_t* order, int64_t G, int64_t N, int k) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < G * N; t += stride) {
    const int64_t g = t / N, n = t % N;
    const float* vg = gate + g * N * k;
    const uint64_t mine = rank_key(vg[n * k], n);
    int64_t place = 0;
    for (int64_t m = 0; m < N; ++m) place += rank_key(vg[m * k], m) > mine;
    order[g * N + place] = n;
  }
}

__global__ void identity_order_kernel(int64_t* order, int64_t G, int64_t N) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < G * N; i += stride) order[i] = i % N;
}

// Block g, thread e (a loop when E exceeds the block): the slots of expert e's choices in group g.
__global__ void assign_slots_kernel(const int64_t* expert, const int64_t* order, int64_t* slot, int64_t* count,
                                    int64_t N, int k, int64_t E, int64_t C) {
  const int64_t g = blockIdx.x;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t used = 0;
    for (int r = 0; r < k; ++r)
      for (int64_t j = 0; j < N; ++j) {
        const int64_t i = (g * N + order[g * N + j]) * k + r;
        if (expert[i] != e) continue;
        slot[i] = used < C ? used++ : -1;
      }
    count[g * E + e] = used;
  }
}

// Thread e: where group g's choices start in expert e's rows, and the rows in use.
__global__ void group_starts_kernel(const int64_t* count, int64_t* start, int64_t* rows, int64_t G, int64_t E) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int64_t acc = 0;
  for (int64_t g = 0; g < G; ++g) {
    start[g * E + e] = acc;
    acc += count[g * E + e];
  }
  rows[e] = acc;
}

__global__ void clear_rows_kernel(int64_t* token, float* weight, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) token[i] = -1, weight[i] = 0.f;
}

// A thread per token: its kept choices written at their rows (the CPU's renormalised weight:
// the gate over the sum of the token's k gates, summed in order).
__global__ void place_kernel(const int64_t* expert, const float* gate, const int64_t* local, const int64_t* start,
                             int64_t* slot, int64_t* token, float* weight, int64_t* token_rows, int64_t G, int64_t N,
                             int k, int64_t E, int64_t R, bool renorm) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < G * N; t += stride) {
    const int64_t g = t / N;
    float sum = 0;
    if (renorm)
      for (int j = 0; j < k; ++j) sum += gate[t * k + j];
    for (int r = 0; r < k; ++r) {
      const int64_t i = t * k + r, x = expert[i];
      if (local[i] < 0) {
        slot[i] = token_rows[i] = -1;
        continue;
      }
      const int64_t row = start[g * E + x] + local[i];
      slot[i] = row;
      token_rows[i] = x * R + row;
      token[x * R + row] = t;
      weight[x * R + row] = !renorm ? gate[i] : sum != 0 ? gate[i] / sum : 0.f;
    }
  }
}

__global__ void route_backward_kernel(const float* dweight, const int64_t* expert, const int64_t* slot,
                                      const float* gate, float* dgates, int64_t tokens, int k, int64_t E, int64_t R,
                                      bool renorm) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < tokens; t += stride) {
    float gr[8];  // k <= 8, checked on the host
    for (int r = 0; r < k; ++r) {
      const int64_t row = slot[t * k + r];
      gr[r] = row < 0 ? 0.f : dweight[expert[t * k + r] * R + row];
    }
    float* grow = dgates + t * E;
    if (!renorm) {
      for (int r = 0; r < k; ++r) grow[expert[t * k + r]] = gr[r];
      continue;
    }
    float sum = 0, dot = 0;
    for (int r = 0; r < k; ++r) sum += gate[t * k + r];
    if (sum == 0) continue;
    for (int r = 0; r < k; ++r) dot += gr[r] * gate[t * k + r] / sum;
    for (int r = 0; r < k; ++r) grow[expert[t * k + r]] = (gr[r] - dot) / sum;
  }
}

__global__ void threshold_kernel(const float* zn, const int64_t* expert, float* th, int64_t tokens, int64_t E,
                                 int64_t k) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < tokens; t += stride)
    th[t] = zn[t * E + expert[t * k + k - 1]];
}

__global__ void load_probs_kernel(const float* z, const float* th, float* probs, int64_t n, int64_t E, float inv) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    probs[i] = ops::fast_normal_cdf((z[i] - th[i / E]) * inv);
}

// A thread per token: dz over its E experts, then dzn at its k-th choice (the CPU's order).
__global__ void load_probs_backward_kernel(const float* g, const float* z, const float* th, const int64_t* expert,
                                           float* dz, float* dzn, int64_t tokens, int64_t E, int64_t k, float inv) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < tokens; t += stride) {
    float dt = 0;
    for (int64_t x = 0; x < E; ++x) {
      const int64_t i = t * E + x;
      const float v = (z[i] - th[t]) * inv, phi = fabsf(v) > 9.f ? 0.f : ops::fast_normal_pdf(v);
      dz[i] = g[i] * phi * inv;
      dt -= dz[i];
    }
    if (dzn) dzn[t * E + expert[t * k + k - 1]] = dt;
  }
}

// A thread per (token t, expert x) of scores (G, N, E).
__global__ void expert_choice_kernel(const float* scores, const float* w, int64_t* token, float* weight,
                                     int64_t* rows, int64_t* token_rows, int64_t G, int64_t N, int64_t E,
                                     int64_t C) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, R = G * C, n = G * N * E;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n > E ? n : E); i += stride) {
    if (i < E) rows[i] = R;  // every row is used
    if (i >= n) continue;
    const int64_t t = i / E, x = i % E, g = t / N;
    const float* col = scores + g * N * E + x;
    const uint64_t mine = rank_key(col[(t % N) * E], t % N);
    int64_t rank = 0;
    for (int64_t m = 0; m < N && rank < C; ++m) rank += rank_key(col[m * E], m) > mine;
    if (rank >= C) {
      token_rows[i] = -1;
      continue;
    }
    const int64_t row = x * R + g * C + rank;
    token[row] = t;
    weight[row] = w[i];
    token_rows[i] = row;
  }
}

// A thread per row: its gradient to the (token, expert) score it came from (one row each).
__global__ void expert_choice_backward_kernel(const float* dweight, const int64_t* token, float* dscores,
                                              int64_t E, int64_t R) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < E * R; i += stride)
    if (token[i] >= 0) dscores[token[i] * E + i / R] = dweight[i];
}

}  // namespace

ops::TopKChoices topk_choices(const Tensor& gates, int k) {
  expect_cuda_f32("topk_choices", "gates", gates);
  const int64_t G = gates.size(0), N = gates.size(1), E = gates.size(2);
  MV_CHECK(k >= 1 && k <= 8, "topk_route: k = ", k, " (--k) is outside [1, 8], what the CUDA kernels support");
  ops::TopKChoices o{device_empty({G, N, k}, DType::I64), device_empty({G, N, k})};
  if (G * N == 0) return o;
  topk_choices_kernel<<<grid_for(G * N, kThreads), kThreads, 0, stream()>>>(
      gates.data<float>(), o.expert.data<int64_t>(), o.gate.data<float>(), G * N, E, k);
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

Tensor fill_order(const Tensor& gate, bool bpr) {
  const int64_t G = gate.size(0), N = gate.size(1), k = gate.size(2);
  Tensor order = device_empty({G, N}, DType::I64);
  if (G * N == 0) return order;
  if (bpr)
    fill_order_kernel<<<grid_for(G * N, kThreads), kThreads, 0, stream()>>>(gate.data<float>(),
                                                                            order.data<int64_t>(), G, N, int(k));
  else
    identity_order_kernel<<<grid_for(G * N, kThreads), kThreads, 0, stream()>>>(order.data<int64_t>(), G, N);
  MV_CUDA_LAUNCH_CHECK();
  return order;
}

ops::Slots assign_slots(const Tensor& expert, const Tensor& order, int64_t E, int64_t C) {
  const int64_t G = expert.size(0), N = expert.size(1), k = expert.size(2);
  ops::Slots o{device_empty({G, N, k}, DType::I64), device_empty({G, E}, DType::I64)};
  if (G == 0) return o;
  assign_slots_kernel<<<unsigned(G), unsigned(std::min<int64_t>(std::max<int64_t>(E, 32), 1024)), 0, stream()>>>(
      expert.data<int64_t>(), order.data<int64_t>(), o.slot.data<int64_t>(), o.count.data<int64_t>(), N, int(k), E, C);
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

ops::Placement place_choices(const Tensor& expert, const Tensor& gate, const ops::Slots& slots, int64_t E, int64_t C,
                             bool renorm) {
  const int64_t G = expert.size(0), N = expert.size(1), k = expert.size(2), R = G * C;
  ops::Placement o;
  o.slot = device_empty({G, N, k}, DType::I64);
  Tensor token = device_empty({E, R}, DType::I64), weight = device_empty({E, R});
  Tensor rows = device_empty({E}, DType::I64), token_rows = device_empty({G, N, k}, DType::I64);
  const Tensor start = device_empty({G, E}, DType::I64);
  if (E > 0)
    group_starts_kernel<<<unsigned(detail::ceil_div(E, kThreads)), kThreads, 0, stream()>>>(
        slots.count.data<int64_t>(), start.data<int64_t>(), rows.data<int64_t>(), G, E);
  if (E * R > 0)
    clear_rows_kernel<<<grid_for(E * R, kThreads), kThreads, 0, stream()>>>(token.data<int64_t>(),
                                                                            weight.data<float>(), E * R);
  if (G * N > 0)
    place_kernel<<<grid_for(G * N, kThreads), kThreads, 0, stream()>>>(
        expert.data<int64_t>(), gate.data<float>(), slots.slot.data<int64_t>(), start.data<int64_t>(),
        o.slot.data<int64_t>(), token.data<int64_t>(), weight.data<float>(), token_rows.data<int64_t>(), G, N,
        int(k), E, R, renorm);
  MV_CUDA_LAUNCH_CHECK();
  o.assign = ops::Assignment{token, weight, rows, token_rows, G, N, C};
  return o;
}

Tensor topk_route_backward(const Tensor& dweight, const Tensor& expert, const Tensor& slot, const Tensor& gate,
                           int64_t E, bool renorm) {
  const int64_t G = expert.size(0), N = expert.size(1), k = expert.size(2), R = dweight.size(1);
  const Tensor gw = dweight.contiguous();
  Tensor dgates = Tensor::zeros({G, N, E}, DType::F32, Device::CUDA);
  if (G * N == 0) return dgates;
  route_backward_kernel<<<grid_for(G * N, kThreads), kThreads, 0, stream()>>>(
      gw.data<float>(), expert.data<int64_t>(), slot.data<int64_t>(), gate.data<float>(), dgates.data<float>(), G * N,
      int(k), E, R, renorm);
  MV_CUDA_LAUNCH_CHECK();
  return dgates;
}

ops::Assignment expert_choice_route_forward(const Tensor& scores_, int64_t C, const Tensor& weights_) {
  const Tensor scores = scores_.contiguous(), weights = weights_.contiguous();
  expect_cuda_f32("expert_choice_route", "scores", scores);
  expect_cuda_f32("expert_choice_route", "weights", weights);
  const int64_t G = scores.size(0), N = scores.size(1), E = scores.size(2), R = G * C;
  Tensor token = device_empty({E, R}, DType::I64), weight = device_empty({E, R});
  Tensor rows = device_empty({E}, DType::I64), token_rows = device_empty({G, N, E}, DType::I64);
  if (E > 0) {
    expert_choice_kernel<<<grid_for(std::max(G * N * E, E), kThreads), kThreads, 0, stream()>>>(
        scores.data<float>(), weights.data<float>(), token.data<int64_t>(), weight.data<float>(),
        rows.data<int64_t>(), token_rows.data<int64_t>(), G, N, E, C);
    MV_CUDA_LAUNCH_CHECK();
  }
  return ops::Assignment{token, weight, rows, token_rows, G, N, C};
}

Tensor expert_choice_route_backward(const Tensor& dweight, const Tensor& token, int64_t G, int64_t N) {
  const int64_t E = token.size(0), R = token.size(1);
  const Tensor gw = dweight.contiguous();
  Tensor dscores = Tensor::zeros({G, N, E}, DType::F32, Device::CUDA);
  if (E * R == 0) return dscores;
  expert_choice_backward_kernel<<<grid_for(E * R, kThreads), kThreads, 0, stream()>>>(
      gw.data<float>(), token.data<int64_t>(), dscores.data<float>(), E, R);
  MV_CUDA_LAUNCH_CHECK();
  return dscores;
}

ops::LoadProbs topk_load_probs_forward(const Tensor& z, const Tensor& zn, const Tensor& expert, float noise_std) {
  expect_cuda_f32("topk_load_probs", "z", z);
  expect_cuda_f32("topk_load_probs", "zn", zn);
  const int64_t G = z.size(0), N = z.size(1), E = z.size(2), k = expert.size(2);
  ops::LoadProbs o{device_empty({G, N, E}), device_empty({G, N})};
  if (G * N == 0) return o;
  threshold_kernel<<<grid_for(G * N, kThreads), kThreads, 0, stream()>>>(
      zn.data<float>(), expert.data<int64_t>(), o.threshold.data<float>(), G * N, E, k);
  load_probs_kernel<<<grid_for(G * N * E, kThreads), kThreads, 0, stream()>>>(
      z.data<float>(), o.threshold.data<float>(), o.probs.data<float>(), G * N * E, E, 1.f / noise_std);
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

ops::LoadProbsGrads topk_load_probs_backward(const Tensor& g_, const Tensor& z, const Tensor& threshold,
                                            const Tensor& expert, float noise_std, bool need_zn) {
  const int64_t G = z.size(0), N = z.size(1), E = z.size(2), k = expert.size(2);
  const Tensor g = g_.contiguous();
  ops::LoadProbsGrads o{device_empty({G, N, E}), need_zn ? Tensor::zeros({G, N, E}, DType::F32, Device::CUDA) : Tensor()};
  if (G * N == 0) return o;
  load_probs_backward_kernel<<<grid_for(G * N, kThreads), kThreads, 0, stream()>>>(
      g.data<float>(), z.data<float>(), threshold.data<float>(), expert.data<int64_t>(), o.dz.data<float>(),
      need_zn ? o.dzn.data<float>() : nullptr, G * N, E, k, 1.f / noise_std);
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

}  // namespace mv::cuda
