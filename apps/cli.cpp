#include "apps/cli.h"

#include <cstdio>
#include <exception>
#include <new>
#include <thread>

#include "engine/error.h"
#include "engine/memory.h"
#include "engine/parallel.h"

namespace mv::cli {

void set_threads(int n) {
  const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
  MV_CHECK(n >= 1 && n <= 4 * cores, "--threads must be in 1..", 4 * cores, " (4 x the ", cores,
           " cores of this machine), got ", n);
  set_num_threads(n);
}

Device parse_device(const std::string& name) {
  MV_CHECK(name == "cpu" || name == "cuda", "--device must be cpu or cuda, got '", name, "'");
  MV_CHECK(name == "cpu" || cuda_available(), "--device cuda: no CUDA device is available (a "
           "build without CUDA, or no GPU found); use --device cpu");
  return name == "cuda" ? Device::CUDA : Device::CPU;
}

int guarded(const char* program, const std::function<int()>& work) {
  try {
    return work();
  } catch (const std::bad_alloc&) {
    std::fflush(stdout);
    std::fprintf(stderr, "\n%s: error: out of memory; lower --batch (or --eval-batch, --images) "
                 "or the model's size\n", program);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "\n%s: error: %s\n", program, e.what());
  } catch (...) {
    std::fflush(stdout);
    std::fprintf(stderr, "\n%s: error: an unknown exception\n", program);
  }
  return 1;
}

}  // namespace mv::cli
