// The world of mpirun's ranks, over MPI_COMM_WORLD.
// The C API only: Open MPI's deprecated C++ bindings do not compile cleanly at -Wextra.
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "dist/comm.h"
#include "engine/error.h"

namespace mv::dist {

namespace {

bool g_mpi = false;  // MPI_Init ran (we were started by mpirun)
int g_rank = 0, g_size = 1;
// The expert groups and the replica groups of make_expert_groups (else the world and this rank).
MPI_Comm g_experts = MPI_COMM_NULL, g_replicas = MPI_COMM_NULL;

MPI_Comm comm(Group g) {
  if (g == Group::Experts && g_experts != MPI_COMM_NULL) return g_experts;
  if (g == Group::Replicas && g_replicas != MPI_COMM_NULL) return g_replicas;
  return g == Group::Replicas ? MPI_COMM_SELF : MPI_COMM_WORLD;
}
double g_comm_s = 0;
std::vector<MPI_Request> g_requests;  // of start_*; a handle is an index, reused once waited

// Adds the lifetime of a collective to g_comm_s.
struct Timed {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  ~Timed() {
    g_comm_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
};

int count(int64_t n, const char* what) {
  MV_CHECK(n >= 0 && n <= INT_MAX, "MPI ", what, ": ", n, " elements is more than one message "
           "can carry (", INT_MAX, ")");
  return int(n);
}

void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  MV_FAIL("MPI ", what, " failed on rank ", g_rank, ": ", std::string(msg, size_t(len)));
}

// Counts and displacements (in elements) of a packed all-to-all over n ranks.
struct Layout {
  std::vector<int> counts, displs;
  Layout(const std::vector<int64_t>& c, int n) {
    MV_CHECK(int(c.size()) == n, "MPI all_to_all_v: ", c.size(), " counts for ", n, " ranks");
    int64_t at = 0;
    for (int64_t n : c) {
      counts.push_back(count(n, "all_to_all_v"));
      displs.push_back(count(at, "all_to_all_v"));
      at += n;
    }
  }
};

// A world of one (not started by mpirun): each collective is a copy.
template <class T>
void copy(const T* from, int64_t n, T* to) {
  std::memcpy(to, from, size_t(n) * sizeof(T));
}

int start(MPI_Request r) {
  for (size_t i = 0; i < g_requests.size(); ++i)
    if (g_requests[i] == MPI_REQUEST_NULL) {
      g_requests[i] = r;
      return int(i);
    }
  g_requests.push_back(r);
  return int(g_requests.size() - 1);
}

}  // namespace

void init(int& argc, char**& argv) {
  const char* n = std::getenv("OMPI_COMM_WORLD_SIZE");
  if (n == nullptr) return;  // not started by mpirun: a world of one, without MPI
  int provided = 0;
  // Only the main thread calls MPI (the loader's thread and OpenMP's never do).
  check(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided), "init");
  // Errors come back as codes, which check() turns into exceptions naming the call.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  g_mpi = true;
}

void finalize() {
  for (MPI_Comm* c : {&g_experts, &g_replicas})
    if (*c != MPI_COMM_NULL) MPI_Comm_free(c);
  if (g_mpi) MPI_Finalize();
  g_mpi = false;
}

int rank(Group g) {
  int r = 0;
  if (g_mpi) MPI_Comm_rank(comm(g), &r);
  return r;
}
int size(Group g) {
  int n = 1;
  if (g_mpi) MPI_Comm_size(comm(g), &n);
  return n;
}

void make_expert_groups(int n) {
  MV_CHECK(n >= 1 && g_size % n == 0, "expert groups of ", n, " ranks do not divide the ", g_size,
           " ranks");
  if (!g_mpi) return;
  check(MPI_Comm_split(MPI_COMM_WORLD, g_rank / n, g_rank, &g_experts), "make_expert_groups");
  check(MPI_Comm_split(MPI_COMM_WORLD, g_rank % n, g_rank, &g_replicas), "make_expert_groups");
}

void abort_all(int code) {
  if (g_mpi && g_size > 1) MPI_Abort(MPI_COMM_WORLD, code);
  finalize();
  std::exit(code);
}

std::string broadcast(const std::string& s) {
  if (g_size == 1) return s;
  Timed t;
  int64_t n = int64_t(s.size());
  check(MPI_Bcast(&n, 1, MPI_INT64_T, 0, MPI_COMM_WORLD), "broadcast");
  std::string out = g_rank == 0 ? s : std::string(size_t(n), '\0');
  check(MPI_Bcast(out.data(), count(n, "broadcast"), MPI_CHAR, 0, MPI_COMM_WORLD), "broadcast");
  return out;
}

void all_gather(const float* send, int64_t n, float* recv, Group g) {
  if (!g_mpi) return copy(send, n, recv);
  Timed t;
  check(MPI_Allgather(send, count(n, "all_gather"), MPI_FLOAT, recv, count(n, "all_gather"),
                      MPI_FLOAT, comm(g)), "all_gather");
}

std::vector<double> sum(const std::vector<double>& v, Group g) {
  const int ranks = size(g);
  if (ranks == 1) return v;
  Timed t;
  const int n = count(int64_t(v.size()), "sum");
  std::vector<double> all(v.size() * size_t(ranks));
  check(MPI_Allgather(v.data(), n, MPI_DOUBLE, all.data(), n, MPI_DOUBLE, comm(g)), "sum");
  std::vector<double> out(v.size(), 0.0);
  for (int r = 0; r < ranks; ++r)
    for (size_t i = 0; i < v.size(); ++i) out[i] += all[size_t(r) * v.size() + i];
  return out;
}

template <class T>
static void alltoallv(const T* send, const std::vector<int64_t>& sc, T* recv,
                      const std::vector<int64_t>& rc, MPI_Datatype type, Group g) {
  if (!g_mpi) return copy(send, sc.at(0), recv);
  Timed t;
  const Layout s(sc, size(g)), r(rc, size(g));
  check(MPI_Alltoallv(send, s.counts.data(), s.displs.data(), type, recv, r.counts.data(),
                      r.displs.data(), type, comm(g)), "all_to_all_v");
}
void all_to_all_v(const float* send, const std::vector<int64_t>& sc, float* recv,
                  const std::vector<int64_t>& rc, Group g) {
  alltoallv(send, sc, recv, rc, MPI_FLOAT, g);
}
void all_to_all_v(const int64_t* send, const std::vector<int64_t>& sc, int64_t* recv,
                  const std::vector<int64_t>& rc, Group g) {
  alltoallv(send, sc, recv, rc, MPI_INT64_T, g);
}

int start_all_to_all(const float* send, int64_t n, float* recv, Group g) {
  if (!g_mpi) return copy(send, n, recv), -1;
  Timed t;
  MPI_Request r;
  check(MPI_Ialltoall(send, count(n, "all_to_all"), MPI_FLOAT, recv, count(n, "all_to_all"),
                      MPI_FLOAT, comm(g), &r), "start_all_to_all");
  return start(r);
}

int start_all_gather(const float* send, int64_t n, float* recv, Group g) {
  if (!g_mpi) return copy(send, n, recv), -1;
  Timed t;
  MPI_Request r;
  check(MPI_Iallgather(send, count(n, "all_gather"), MPI_FLOAT, recv, count(n, "all_gather"),
                       MPI_FLOAT, comm(g), &r), "start_all_gather");
  return start(r);
}

void wait(int h) {
  if (h < 0) return;  // a world of one's copy, done at the start
  Timed t;
  MV_CHECK(h >= 0 && size_t(h) < g_requests.size(), "MPI wait: no request ", h);
  check(MPI_Wait(&g_requests[size_t(h)], MPI_STATUS_IGNORE), "wait");
}

double take_comm_seconds() {
  const double s = g_comm_s;
  g_comm_s = 0;
  return s;
}

}  // namespace mv::dist
