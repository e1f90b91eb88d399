// The processes of one training run and the collectives training needs (Open MPI).
//
// A program started by mpirun (Open MPI sets OMPI_COMM_WORLD_SIZE) joins MPI_COMM_WORLD in
// init(); any other process, and every process of a build without MPI (comm_single.cpp), is a
// world of one rank, where each collective is a copy. Every rank must call the collectives in
// the same order with the same sizes. Buffers live on the CPU.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mv::dist {

// Who takes part in a collective: every rank; the ranks of this rank's expert group (the
// --expert-parallel ranks that share out each MoE layer's experts); or the ranks that hold the
// same experts as this one, one in each expert group. Until make_expert_groups, an expert group
// is the whole world (and the replicas this rank alone).
enum class Group { World, Experts, Replicas };

void init(int& argc, char**& argv);  // once, before any other call; a no-op outside mpirun
void finalize();                     // at a normal exit
int rank(Group g = Group::World);    // 0 .. size(g)-1
int size(Group g = Group::World);
// Cuts the world into expert groups of n consecutive ranks (n divides size()); collective.
void make_expert_groups(int n);
// Ends every rank of the run with `code` (after an error on one rank, so that none waits in a
// collective for it); exits this process in a world of one.
[[noreturn]] void abort_all(int code);

// rank 0's s, on every rank.
std::string broadcast(const std::string& s);
// send: n floats on every rank of g -> recv: size(g) * n floats, rank r's at r * n.
void all_gather(const float* send, int64_t n, float* recv, Group g = Group::World);
// The elementwise sums over the ranks of g, added in rank order, so each gets the same bits.
std::vector<double> sum(const std::vector<double>& v, Group g = Group::World);
// send holds a piece for each rank of g, send_counts[r] elements for rank r, packed in rank
// order; recv gets rank r's piece for this rank, recv_counts[r] elements, packed in rank order.
void all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                  const std::vector<int64_t>& recv_counts, Group g = Group::World);
void all_to_all_v(const int64_t* send, const std::vector<int64_t>& send_counts, int64_t* recv,
                  const std::vector<int64_t>& recv_counts, Group g = Group::World);

// Nonblocking all-to-all of equal pieces (send: size(g) pieces of n floats, piece r for rank r;
// recv: rank r's piece for this rank at r * n) and all_gather, for the bucketed gradient
// reduction: start_* returns a handle that wait() completes; the buffers must stay untouched
// until then.
int start_all_to_all(const float* send, int64_t n, float* recv, Group g = Group::World);
int start_all_gather(const float* send, int64_t n, float* recv, Group g = Group::World);
void wait(int handle);

// Seconds spent inside the collectives above since the last call (the benchmarks' split of a
// step into computation and communication).
double take_comm_seconds();

}  // namespace mv::dist
