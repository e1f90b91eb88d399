// The op layer's dispatch idiom (ops/dispatch.h): the CPU twin runs for CPU tensors, a kernel
// without a CUDA twin refuses CUDA tensors naming the op, and the device checks name the op.
#include <string>

#include "ops/dispatch.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;

// A toy kernel pair; only its CPU half exists, as for the MoE kernels today.
namespace mv::cpu {
Tensor twice(const Tensor& x) { return Tensor::from({2 * x.item()}, {}); }
}  // namespace mv::cpu

TEST_CASE("dispatch: the CPU twin runs for CPU tensors; a missing CUDA twin names the op") {
  const Tensor x = Tensor::scalar(3.f);
  const ops::OpDevice dev = ops::device_of("twice", {&x});
  CHECK(dev.device == Device::CPU);
  CHECK(std::string(dev.op) == "twice");
  check_close(MV_CPU_KERNEL(twice)(dev, x), {6.f});
  // The CUDA branch is taken on the device alone, so it can be tested without a GPU.
  const ops::OpDevice on_gpu{"twice", Device::CUDA};
  const char* expected = ops::kCudaBuilt ? "twice: has no CUDA kernel yet (twice)" : "twice: moevit was built without CUDA";
  CHECK_THROWS_WITH_AS(MV_CPU_KERNEL(twice)(on_gpu, x), doctest::Contains(expected), Error);
}

TEST_CASE("dispatch: device_of skips undefined inputs and needs one defined; expect_f32 names the op") {
  const Tensor x = Tensor::zeros({2}), none;
  CHECK(ops::device_of("op", {&none, &x}).device == Device::CPU);
  CHECK_THROWS_WITH_AS(ops::device_of("op", {&none}), doctest::Contains("op: an input is undefined"), Error);
  const Tensor i = Tensor::zeros({2}, DType::I64);
  CHECK_THROWS_WITH_AS(ops::expect_f32("op", {&x, &i}), doctest::Contains("op: expected an F32 tensor, got I64 (2) cpu"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::expect_f32("op", {&none}), doctest::Contains("op: an input is undefined"), Error);
}
