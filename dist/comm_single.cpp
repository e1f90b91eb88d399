// A world of one rank: the build without MPI. Each collective copies its input.
#include <cstdlib>
#include <cstring>

#include "dist/comm.h"
#include "engine/error.h"

namespace mv::dist {

void init(int&, char**&) {
  MV_CHECK(std::getenv("OMPI_COMM_WORLD_SIZE") == nullptr ||
               std::string(std::getenv("OMPI_COMM_WORLD_SIZE")) == "1",
           "this program was started by mpirun with ", std::getenv("OMPI_COMM_WORLD_SIZE"),
           " ranks, but moevit was built without MPI (install libopenmpi-dev and rebuild)");
}
void finalize() {}
int rank(Group) { return 0; }
int size(Group) { return 1; }
void make_expert_groups(int n) {
  MV_CHECK(n == 1, "expert groups of ", n, " ranks in a world of one");
}
void abort_all(int code) { std::exit(code); }

std::string broadcast(const std::string& s) { return s; }
void all_gather(const float* send, int64_t n, float* recv, Group) {
  std::memcpy(recv, send, size_t(n) * sizeof(float));
}
std::vector<double> sum(const std::vector<double>& v, Group) { return v; }
void all_to_all_v(const float* send, const std::vector<int64_t>& sc, float* recv,
                  const std::vector<int64_t>&, Group) {
  std::memcpy(recv, send, size_t(sc.at(0)) * sizeof(float));
}
void all_to_all_v(const int64_t* send, const std::vector<int64_t>& sc, int64_t* recv,
                  const std::vector<int64_t>&, Group) {
  std::memcpy(recv, send, size_t(sc.at(0)) * sizeof(int64_t));
}
int start_all_to_all(const float* send, int64_t n, float* recv, Group) {
  all_gather(send, n, recv);
  return -1;
}
int start_all_gather(const float* send, int64_t n, float* recv, Group) {
  all_gather(send, n, recv);
  return -1;
}
void wait(int) {}  // the copy was done at the start
double take_comm_seconds() { return 0; }

}  // namespace mv::dist
