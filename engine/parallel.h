// Parallel loops over an index range with OpenMP. Small ranges run serially: spawning a team
// costs a few microseconds, more than the work of a short loop.
#pragma once
#include <cstdint>

namespace mv {

void set_num_threads(int n);  // OpenMP's count, which Eigen's GEMM follows too
int num_threads();
int omp_thread_index();
int omp_team_size();

// f(begin, end) over chunks of [0, n). `cost` is the rough work per index, in flops; the loop
// goes parallel when n * cost is large enough to pay for the team.
template <class F>
void parallel_for(int64_t n, int64_t cost, F&& f) {
  constexpr int64_t kMinWork = 1 << 15;
  if (n <= 0) return;
  if (n * cost < kMinWork || num_threads() == 1) {
    f(int64_t(0), n);
    return;
  }
#pragma omp parallel
  {
    const int64_t t = omp_thread_index(), nt = omp_team_size();
    const int64_t chunk = (n + nt - 1) / nt;
    const int64_t b = t * chunk, e = b + chunk < n ? b + chunk : n;
    if (b < e) f(b, e);
  }
}

}  // namespace mv
