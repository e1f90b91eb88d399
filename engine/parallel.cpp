#include "engine/parallel.h"

#include <omp.h>

namespace mv {

static int g_threads = 0;  // 0: OpenMP's default

void set_num_threads(int n) {
  g_threads = n;
  if (n > 0) omp_set_num_threads(n);
}
int num_threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }
int omp_thread_index() { return omp_get_thread_num(); }
int omp_team_size() { return omp_get_num_threads(); }

}  // namespace mv
