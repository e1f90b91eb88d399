// Regression tests for what fuzzing the readers found (fuzz/, docs/reliability.md "Fuzzing"):
// each input class that crashed, misbehaved or was silently misread is refused with a message
// that names the file or field.
#include <cstdint>
#include <filesystem>
#include <string>

#include "engine/file_write.h"
#include "engine/safetensors.h"
#include "tests/helpers.h"
#include "train/config.h"

using namespace mv;
using mv::train::TrainConfig;

namespace {

// A saved configuration with the text of one field's value replaced.
std::string with_field(const std::string& json, const std::string& key, const std::string& value) {
  const std::string at = "\"" + key + "\":";
  const size_t begin = json.find(at);
  REQUIRE(begin != std::string::npos);
  const size_t from = begin + at.size(), end = json.find_first_of(",}", from);
  return json.substr(0, from) + value + json.substr(end);
}

// A safetensors file of one header and `data_bytes` zero bytes of data.
void write_safetensors(const std::string& path, const std::string& header, size_t data_bytes) {
  const uint64_t n = header.size();
  write_file(path, std::string(reinterpret_cast<const char*>(&n), 8) + header +
                       std::string(data_bytes, '\0'));
}

}  // namespace

// fuzz_config: a float where an integer belongs (1e30 into an int is undefined behaviour in the
// JSON library's conversion), and integers outside the field's type, which used to be truncated
// or wrapped into a different, valid-looking configuration.
TEST_CASE("config.json: integer fields take only integers in their type's range") {
  TrainConfig moe;
  moe.model = "vmoe-tiny";
  moe.vit = models::vit_preset("vmoe-tiny");
  const std::string dense = TrainConfig().to_json(), routed = moe.to_json();
  CHECK_THROWS_WITH_AS(TrainConfig::from_json(with_field(dense, "epochs", "1e30")),
                       doctest::Contains("epochs = 1e+30, expected an integer in "
                                         "-2147483648..2147483647"),
                       Error);
  CHECK_THROWS_WITH_AS(TrainConfig::from_json(with_field(dense, "depth", "2.5")),
                       doctest::Contains("depth = 2.5, expected an integer"), Error);
  // 2^32 + 10 once read as 10 epochs.
  CHECK_THROWS_WITH_AS(TrainConfig::from_json(with_field(dense, "epochs", "4294967306")),
                       doctest::Contains("epochs = 4294967306"), Error);
  CHECK_THROWS_WITH_AS(TrainConfig::from_json(with_field(dense, "seed", "-1")),
                       doctest::Contains("seed = -1, expected an integer in 0..18446744073709551615"),
                       Error);
  CHECK_THROWS_WITH_AS(TrainConfig::from_json(with_field(dense, "limit_train", "-1e300")),
                       doctest::Contains("limit_train = -1e+300"), Error);
  CHECK_THROWS_WITH_AS(TrainConfig::from_json(with_field(dense, "prc_blocks", "[1,3.5]")),
                       doctest::Contains("prc_blocks[1] = 3.5"), Error);
  CHECK_THROWS_WITH_AS(TrainConfig::from_json(with_field(dense, "prc_blocks", "7")),
                       doctest::Contains("prc_blocks = 7, expected an array"), Error);
  CHECK_THROWS_WITH_AS(TrainConfig::from_json(with_field(routed, "experts", "1e10")),
                       doctest::Contains("moe.experts = 10000000000.0"), Error);
  // Integers in range still read, unsigned seeds to the top of their range included.
  const std::string big_seed = with_field(dense, "seed", "18446744073709551615");
  CHECK(TrainConfig::from_json(big_seed).seed == 18446744073709551615ull);
  CHECK(TrainConfig::from_json(routed).to_json() == routed);
}

// fuzz_safetensors (found by a hand-made input while writing the target; the fuzzer itself had
// not reached it in 10^6 inputs): shape sizes whose product passes 2^63 overflowed the element
// count (undefined behaviour) before the size check, and sizes past 2^63 - 1 turned negative.
TEST_CASE("safetensors: shapes whose element count overflows are refused") {
  const std::string path =
      (std::filesystem::temp_directory_path() / "moevit_test_readers.safetensors").string();
  auto header = [](const std::string& shape, const std::string& dtype = "F32") {
    return R"({"w":{"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":[0,0]}})";
  };
  write_safetensors(path, header("[4294967296,4294967296]"), 0);
  CHECK_THROWS_WITH_AS(load_safetensors(path),
                       doctest::Contains("tensor 'w': shape [4294967296,4294967296] has more "
                                         "than 2^63 elements"),
                       Error);
  write_safetensors(path, header("[4294967296,4294967296,0]"), 0);  // empty, strides overflow
  CHECK_THROWS_WITH_AS(load_safetensors(path), doctest::Contains("more than 2^63 elements"), Error);
  write_safetensors(path, header("[9223372036854775808]"), 0);
  CHECK_THROWS_WITH_AS(load_safetensors(path),
                       doctest::Contains("shape entries must be integers in 0..2^63-1, got "
                                         "9223372036854775808"),
                       Error);
  write_safetensors(path, header("[4611686018427387904]"), 0);  // 2^62 F32: 2^64 bytes
  CHECK_THROWS_WITH_AS(load_safetensors(path), doctest::Contains("needs more than 2^64 bytes"),
                       Error);
  // Empty tensors with large sizes beside the zero still read.
  write_safetensors(path, header("[0,1000000]", "I64"), 0);
  CHECK(load_safetensors(path).at("w").shape() == Shape{0, 1000000});
  std::filesystem::remove(path);
}
