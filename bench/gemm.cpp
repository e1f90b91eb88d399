// GEMM throughput: ops::matmul / ops::bmm (Eigen underneath) against OpenBLAS's cblas_sgemm on
// the same number of threads, at the shapes a ViT-S/MoE training step runs (6400 = 128 images x
// 50 tokens) plus square references and batched attention products.
//
// Per shape: 3 warm-up calls each, then 5 rounds of (repeats/5 calls of ours, a 20 ms rest,
// repeats/5 calls of OpenBLAS, a 200 ms rest); the figures are the median and the fastest call
// over all rounds. Rounds alternate so that load from other processes, which drifts, hits both
// libraries alike. The rests matter on a 2-core machine: after a call each library's idle
// worker threads keep spinning for a while (OpenBLAS's for about 2^28 cycles, ~0.1 s), and a
// spinning thread of one library stalls the other's fork-join. The fastest call shows what the
// kernel does when no other process took a core. No cache flush between calls. Ours includes
// allocating the output (from the CPU pool); OpenBLAS writes into a preallocated buffer. The
// last column compares the two results.
//
// Batched shapes: OpenBLAS 0.3.21 has no batched sgemm, so its figure is the faster of (a) a
// loop of calls with OpenBLAS threaded and (b) an OpenMP loop over the batch with OpenBLAS
// single-threaded; the row says which.
//
// With --bf16, ours rounds its inputs to bfloat16 (ops::set_matmul_bf16) and the last column
// shows the rounding's error against OpenBLAS's FP32 product.
//
//   ./build/bench/bench_gemm [--threads 2] [--repeats 25] [--bf16]
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "engine/random.h"
#include "ops/matmul.h"
#include "ops/shape.h"

#ifdef MV_HAVE_OPENBLAS
#include <cblas.h>
#endif

using namespace mv;

namespace {

using Clock = std::chrono::steady_clock;

struct Case {
  std::string label;
  int64_t batch, M, K, N;
  bool ta = false, tb = false;  // operand stored transposed (ours reads it through a transposed view)
};

// Per-call times (ms) collected over several blocks of calls.
struct Samples {
  std::vector<double> t;
  void block(const std::function<void()>& f, int n) {
    for (int i = 0; i < n; ++i) {
      auto a = Clock::now();
      f();
      t.push_back(std::chrono::duration<double, std::milli>(Clock::now() - a).count());
    }
  }
  double median() {
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
  double best() { return *std::min_element(t.begin(), t.end()); }
};

void rest(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

std::string dims(const Case& c) {
  std::string s = std::to_string(c.M) + "x" + std::to_string(c.K) + "x" + std::to_string(c.N);
  return c.batch > 1 ? std::to_string(c.batch) + " x " + s : s;
}

struct Data {
  Tensor A, B;  // stored operands: A (batch, M, K), or (batch, K, M) when ta; same for B
  Tensor out;   // ours
  double ours_med = NAN, ours_best = NAN, ref_med = NAN, ref_best = NAN, diff = NAN;
  std::string how;
};

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, repeats = 25;
  CLI::App app{"GEMM: ours vs OpenBLAS"};
  app.add_option("--threads", threads)->capture_default_str();
  app.add_option("--repeats", repeats)->capture_default_str();
  bool bf16 = false;
  app.add_flag("--bf16", bf16, "ours on bfloat16 inputs with FP32 sums (ops::set_matmul_bf16)");
  CLI11_PARSE(app, argc, argv);
  set_num_threads(threads);
  ops::set_matmul_bf16(bf16);
  constexpr int kRounds = 5;
  const int per_round = std::max(1, repeats / kRounds);

  const std::vector<Case> cases = {
      {"linear fwd", 1, 6400, 64, 64},       {"linear fwd", 1, 6400, 64, 192},
      {"linear fwd", 1, 6400, 192, 64},      {"linear fwd", 1, 6400, 64, 256},
      {"linear fwd", 1, 6400, 256, 64},      {"square", 1, 512, 512, 512},
      {"square", 1, 1024, 1024, 1024},       {"attention QK^T-like", 512, 50, 16, 50},
      {"attention PV-like", 512, 50, 50, 16},
      // the backward GEMMs of linear: dx = dy w^T (B transposed), dw = x^T dy (A transposed)
      {"linear dx = dy w^T", 1, 6400, 192, 64, false, true},
      {"linear dx = dy w^T", 1, 6400, 64, 192, false, true},
      {"linear dw = x^T dy", 1, 64, 6400, 192, true, false},
      {"linear dw = x^T dy", 1, 192, 6400, 64, true, false},
  };

  std::printf("bench_gemm: %d threads (ours: OpenMP + tile_gemm / Eigen%s; OpenBLAS: openblas_set_num_threads, "
              "FP32)\n", threads, bf16 ? ", bfloat16 inputs" : ", FP32");
  std::printf("per shape: 3 warm-up calls each, then 5 rounds of (%d calls of ours, 20 ms rest, %d calls of "
              "OpenBLAS, 200 ms rest);\nmedian and fastest call over all rounds; no cache flush; "
              "GFLOP/s = 2*batch*M*N*K / time\n", per_round, per_round);
#ifndef MV_HAVE_OPENBLAS
  std::printf("(built without OpenBLAS: reference columns are empty)\n");
#endif

  Generator gen(42);
  {  // wake the thread pools and the allocator before anything is timed
    Tensor w = randn({512, 512}, gen);
    autograd::NoGrad ng;
    for (int i = 0; i < 20; ++i) ops::matmul(w, w);
  }
  std::vector<Data> data(cases.size());
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& c = cases[ci];
    Data& d = data[ci];
    Shape sa = c.ta ? Shape{c.K, c.M} : Shape{c.M, c.K};
    Shape sb = c.tb ? Shape{c.N, c.K} : Shape{c.K, c.N};
    if (c.batch > 1) {
      sa.insert(sa.begin(), c.batch);
      sb.insert(sb.begin(), c.batch);
    }
    d.A = randn(sa, gen);
    d.B = randn(sb, gen);
    const Tensor a = c.ta ? ops::transpose(d.A, -1, -2) : d.A, b = c.tb ? ops::transpose(d.B, -1, -2) : d.B;
    auto ours = [&] {
      autograd::NoGrad ng;
      d.out = c.batch > 1 ? ops::bmm(a, b) : ops::matmul(a, b);
    };
    for (int i = 0; i < 3; ++i) ours();
    Samples so, sr;
#ifdef MV_HAVE_OPENBLAS
    std::vector<float> C(size_t(c.batch * c.M * c.N));
    const float *pa = d.A.data<float>(), *pb = d.B.data<float>();
    const int lda = int(c.ta ? c.M : c.K), ldb = int(c.tb ? c.K : c.N);
    auto one = [&](int64_t i) {
      cblas_sgemm(CblasRowMajor, c.ta ? CblasTrans : CblasNoTrans, c.tb ? CblasTrans : CblasNoTrans, int(c.M),
                  int(c.N), int(c.K), 1.f, pa + i * c.M * c.K, lda, pb + i * c.K * c.N, ldb, 0.f,
                  C.data() + i * c.M * c.N, int(c.N));
    };
    std::function<void()> blas = [&] {
      for (int64_t i = 0; i < c.batch; ++i) one(i);
    };
    int blas_threads = threads;
    if (c.batch > 1) {  // the faster of a threaded loop and an OpenMP loop of 1-thread calls
      auto omp_loop = [&] {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < c.batch; ++i) one(i);
      };
      Samples s1, s2;
      openblas_set_num_threads(threads);
      s1.block(blas, 3 + per_round);
      rest(200);
      openblas_set_num_threads(1);
      s2.block(omp_loop, 3 + per_round);
      rest(200);
      d.how = " (loop)";
      if (s2.median() < s1.median()) {
        blas = omp_loop;
        blas_threads = 1;
        d.how = " (omp loop)";
      }
    }
    openblas_set_num_threads(blas_threads);
    for (int i = 0; i < 3; ++i) blas();
    rest(200);
#endif
    for (int r = 0; r < kRounds; ++r) {
      so.block(ours, per_round);
#ifdef MV_HAVE_OPENBLAS
      rest(20);
      sr.block(blas, per_round);
      rest(200);
#endif
    }
    d.ours_med = so.median();
    d.ours_best = so.best();
#ifdef MV_HAVE_OPENBLAS
    d.ref_med = sr.median();
    d.ref_best = sr.best();
    // max |ours - OpenBLAS| / max |OpenBLAS|
    const float* po = d.out.data<float>();
    double md = 0, mr = 0;
    for (size_t i = 0; i < C.size(); ++i) {
      md = std::max(md, double(std::fabs(po[i] - C[i])));
      mr = std::max(mr, double(std::fabs(C[i])));
    }
    d.diff = md / mr;
#endif
  }
  std::printf("\n| case | batch x M x K x N | ours ms | ours GFLOP/s | OpenBLAS ms | OpenBLAS GFLOP/s | "
              "ours/OpenBLAS | best-call ours/OpenBLAS GFLOP/s | max rel diff |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& c = cases[ci];
    const Data& d = data[ci];
    const double gflop = 2.0 * double(c.batch * c.M * c.N * c.K) * 1e-9;
    std::printf("| %s%s | %s | %.3f | %.1f | %.3f | %.1f | %.2f | %.0f / %.0f | %.1e |\n", c.label.c_str(),
                d.how.c_str(), dims(c).c_str(), d.ours_med, gflop / d.ours_med * 1e3, d.ref_med,
                gflop / d.ref_med * 1e3, d.ref_med / d.ours_med, gflop / d.ours_best * 1e3,
                gflop / d.ref_best * 1e3, d.diff);
  }
  return 0;
}
