#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "engine/memory.h"
#include "engine/parallel.h"
#include "engine/philox.h"
#include "engine/random.h"
#include "engine/safetensors.h"
#include "tests/helpers.h"

using namespace mv;

TEST_CASE("tensor factories, shapes and views") {
  Tensor t = Tensor::from({1, 2, 3, 4, 5, 6}, {2, 3});
  CHECK(t.shape() == Shape{2, 3});
  CHECK(t.size(-1) == 3);
  CHECK(t.numel() == 6);
  CHECK(t.is_contiguous());
  // A transposed view reads the same storage through swapped strides.
  Tensor tt = t.view_as({3, 2}, {1, 3}, 0);
  CHECK(!tt.is_contiguous());
  CHECK(tt.contiguous().to_vector<float>() == std::vector<float>{1, 4, 2, 5, 3, 6});
  CHECK(Tensor::zeros({2, 2}).to_vector<float>() == std::vector<float>(4, 0.f));
  CHECK(Tensor::full({3}, 2.5f).to_vector<float>() == std::vector<float>(3, 2.5f));
  CHECK(Tensor::arange(4).to_vector<int64_t>() == std::vector<int64_t>{0, 1, 2, 3});
  CHECK_THROWS_WITH_AS(Tensor::from({1, 2, 3}, {2, 2}), doctest::Contains("do not fill shape (2, 2)"), Error);
  CHECK_THROWS_WITH_AS(t.size(2), doctest::Contains("out of range"), Error);
  CHECK_THROWS_WITH_AS(t.data<int64_t>(), doctest::Contains("is not I64"), Error);
}

TEST_CASE("contiguous copies of strided views, element by element against their strides") {
  // Every order of a (3, 37, 5, 40) tensor's axes, some with an offset and a step, in F32 and I64:
  // plain strided runs, transposed matrices (tiled past 32 on both sides) and mixtures.
  const Shape base = {3, 37, 5, 40};
  const int64_t n = shape_numel(base);
  std::vector<float> vf(static_cast<size_t>(n));
  std::vector<int64_t> vi(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) vf[size_t(i)] = float(i), vi[size_t(i)] = i * 3 + 1;
  const Tensor tf = Tensor::from(vf, base), ti = Tensor::from_i64(vi, base);
  const Shape st = {37 * 5 * 40, 5 * 40, 40, 1};
  std::vector<int> perm = {0, 1, 2, 3};
  int cases = 0;
  do {
    for (int64_t offset : {int64_t(0), int64_t(41)}) {
      Shape shape(4), strides(4);
      for (int d = 0; d < 4; ++d) shape[size_t(d)] = base[size_t(perm[size_t(d)])], strides[size_t(d)] = st[size_t(perm[size_t(d)])];
      for (int d = 0; d < 4; ++d)  // the offset view stays inside the storage: 2 of base axis 0's 3
        if (offset && perm[size_t(d)] == 0) shape[size_t(d)] = 2;
      const std::vector<float> got = tf.view_as(shape, strides, offset).contiguous().to_vector<float>();
      const std::vector<int64_t> goti = ti.view_as(shape, strides, offset).contiguous().to_vector<int64_t>();
      int64_t bad = 0, i = 0;
      for (int64_t a = 0; a < shape[0]; ++a)
        for (int64_t b = 0; b < shape[1]; ++b)
          for (int64_t c = 0; c < shape[2]; ++c)
            for (int64_t d = 0; d < shape[3]; ++d, ++i) {
              const int64_t src = offset + a * strides[0] + b * strides[1] + c * strides[2] + d * strides[3];
              bad += got[size_t(i)] != vf[size_t(src)] || goti[size_t(i)] != vi[size_t(src)];
            }
      INFO("axes " << perm[0] << perm[1] << perm[2] << perm[3] << ", offset " << offset);
      CHECK(bad == 0);
      ++cases;
    }
  } while (std::next_permutation(perm.begin(), perm.end()));
  CHECK(cases == 48);
  // A strided scalar and an empty view.
  CHECK(tf.view_as({}, {}, 7).contiguous().item() == 7.f);
  CHECK(tf.view_as({0, 3}, {1, 40}, 0).contiguous().numel() == 0);
}

TEST_CASE("clone copies, detach shares storage") {
  Tensor t = Tensor::from({1, 2}, {2});
  Tensor c = t.clone(), d = t.detach();
  t.data<float>()[0] = 9;
  CHECK(c.to_vector<float>()[0] == 1);
  CHECK(d.to_vector<float>()[0] == 9);
}

TEST_CASE("CPU pool reuses freed blocks") {
  { Tensor warm = Tensor::empty({1000}); }
  const size_t before = cpu_pool_stats().system_allocs;
  for (int i = 0; i < 10; ++i) {
    Tensor a = Tensor::empty({1000});
    Tensor b = Tensor::empty({999});  // same size class
  }
  // The first pass may need one more block for b; every later pass reuses both.
  CHECK(cpu_pool_stats().system_allocs <= before + 1);
}

TEST_CASE("philox4x32-10 matches the Random123 known-answer vectors") {
  philox::U4 a = philox::philox4x32_10({0, 0, 0, 0}, 0, 0);
  CHECK(a.x == 0x6627e8d5u);
  CHECK(a.y == 0xe169c58du);
  CHECK(a.z == 0xbc57ac4cu);
  CHECK(a.w == 0x9b00dbd8u);
  philox::U4 b = philox::philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
                                       0xffffffffu, 0xffffffffu);
  CHECK(b.x == 0x408f276du);
  CHECK(b.y == 0x41c83b0eu);
  CHECK(b.z == 0xa20bc7c6u);
  CHECK(b.w == 0x6d5451fdu);
  philox::U4 c = philox::philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
                                       0xa4093822u, 0x299f31d0u);
  CHECK(c.x == 0xd16cfe09u);
  CHECK(c.y == 0x94fdccebu);
  CHECK(c.z == 0x5001e420u);
  CHECK(c.w == 0x24126ea1u);
}

TEST_CASE("random tensors: reproducible, offsets advance, moments right") {
  Generator g1(7), g2(7);
  std::vector<float> a = randn({1000}, g1).to_vector<float>();
  CHECK(a == randn({1000}, g2).to_vector<float>());
  CHECK(g1.offset == 500);
  CHECK(randn({10}, g1).to_vector<float>() != std::vector<float>(a.begin(), a.begin() + 10));

  Generator g(3);
  std::vector<float> n = randn({100000}, g).to_vector<float>();
  double m = 0, v = 0;
  for (float x : n) m += x;
  m /= n.size();
  for (float x : n) v += (x - m) * (x - m);
  v /= n.size();
  CHECK(std::fabs(m) < 0.02);
  CHECK(std::fabs(v - 1.0) < 0.02);

  std::vector<float> u = rand({100000}, g).to_vector<float>();
  double mu = 0;
  for (float x : u) {
    CHECK_UNARY(x >= 0.f && x < 1.f);
    mu += x;
  }
  CHECK(std::fabs(mu / u.size() - 0.5) < 0.01);

  std::vector<float> b = bernoulli({100000}, 0.3f, g).to_vector<float>();
  double mb = 0;
  for (float x : b) mb += x;
  CHECK(std::fabs(mb / b.size() - 0.3) < 0.01);

  std::vector<int64_t> p = randperm(100, g).to_vector<int64_t>();
  std::vector<int64_t> sorted = p;
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == Tensor::arange(100).to_vector<int64_t>());
  CHECK(p != sorted);

  std::vector<float> tn = trunc_normal({10000}, 0.02f, -2.f, 2.f, g).to_vector<float>();
  for (float x : tn) CHECK_UNARY(std::fabs(x) <= 0.04f + 1e-7f);
}

TEST_CASE("Box-Muller's log and sine / cosine stay within a few ulp of double precision") {
  double worst_log = 0, worst_s = 0, worst_c = 0;
  for (uint32_t k = 1; k <= (1u << 24); k += 97) {  // u1's grid, (0, 1]
    const float u = float(k) * (1.f / 16777216.f);
    const double want = std::log(double(u));
    worst_log = std::max(worst_log, std::fabs(philox::log_positive(u) - want) / std::max(std::fabs(want), 1e-30));
  }
  for (uint32_t k = 0; k < (1u << 24); k += 89) {  // to_unit's grid, [0, 1)
    const float u = float(k) * (1.f / 16777216.f);
    float s, c;
    philox::sincos_turns(u, s, c);
    const double a = 2.0 * M_PI * double(u);
    worst_s = std::max(worst_s, std::fabs(s - std::sin(a)));
    worst_c = std::max(worst_c, std::fabs(c - std::cos(a)));
  }
  INFO("log " << worst_log << " relative, sin " << worst_s << ", cos " << worst_c << " absolute");
  CHECK(worst_log < 3e-7);
  CHECK(worst_s < 2e-7);
  CHECK(worst_c < 2e-7);
  CHECK(philox::log_positive(1.f) == 0.f);  // u1 = 1 gives radius 0, not NaN
  float s, c;
  philox::sincos_turns(0.25f, s, c);  // quarter turns are exact
  CHECK((s == 1.f && c == 0.f));
}

TEST_CASE("randn is philox::normal draw for draw, bitwise, at any thread count and odd sizes") {
  // randn computes the Box-Muller pairs once per block and splits them over threads; every value
  // must still be exactly philox::normal(seed, offset, i), which the CUDA kernel matches too.
  const int saved = num_threads();
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(40001)}) {
      Generator g(11);
      g.offset = 5;
      const std::vector<float> v = randn({n}, g).to_vector<float>();
      CHECK(g.offset == uint64_t(5 + (n + 1) / 2));
      int64_t mismatches = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float ref = philox::normal(11, 5, uint64_t(i));
        mismatches += std::memcmp(&v[size_t(i)], &ref, sizeof ref) != 0;
      }
      INFO("threads " << threads << ", n " << n);
      CHECK(mismatches == 0);
    }
  }
  set_num_threads(saved);
}

static std::string tmp_path(const char* name) { return std::string("/tmp/moevit_test_") + name; }

static void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

static std::string with_header(const std::string& json, size_t data_bytes) {
  uint64_t n = json.size();
  std::string s(reinterpret_cast<const char*>(&n), 8);
  return s + json + std::string(data_bytes, '\0');
}

TEST_CASE("safetensors round trip") {
  const std::string path = tmp_path("roundtrip.safetensors");
  TensorMap m{{"w", Tensor::from({1, 2, 3, 4, 5, 6}, {2, 3})},
              {"idx", Tensor::from_i64({7, -8}, {2})},
              {"scalar", Tensor::scalar(3.5f)}};
  save_safetensors(path, m, {{"step", "12"}});
  Metadata meta;
  TensorMap back = load_safetensors(path, &meta);
  CHECK(meta.at("step") == "12");
  CHECK(back.at("w").shape() == Shape{2, 3});
  CHECK(back.at("w").to_vector<float>() == m.at("w").to_vector<float>());
  CHECK(back.at("idx").to_vector<int64_t>() == std::vector<int64_t>{7, -8});
  CHECK(back.at("scalar").item() == 3.5f);
  std::remove(path.c_str());
}

TEST_CASE("safetensors rejects corrupt files with clear errors") {
  const std::string path = tmp_path("bad.safetensors");
  SUBCASE("truncated data") {
    save_safetensors(path, {{"w", Tensor::zeros({4, 4})}});
    std::ifstream in(path, std::ios::binary);
    std::string all((std::istreambuf_iterator<char>(in)), {});
    write_bytes(path, all.substr(0, all.size() - 5));
    CHECK_THROWS_WITH_AS(load_safetensors(path), doctest::Contains("fall outside"), Error);
  }
  SUBCASE("shorter than the length prefix") {
    write_bytes(path, "abc");
    CHECK_THROWS_WITH_AS(load_safetensors(path), doctest::Contains("fewer than the 8-byte"), Error);
  }
  SUBCASE("header length beyond the file") {
    std::string bytes = with_header("{}", 0);
    bytes[0] = '\xff';  // the length prefix's low byte: 255 bytes of header in a shorter file
    write_bytes(path, bytes);
    CHECK_THROWS_WITH_AS(load_safetensors(path), doctest::Contains("header length"), Error);
  }
  SUBCASE("header not JSON") {
    write_bytes(path, with_header("{not json", 0));
    CHECK_THROWS_WITH_AS(load_safetensors(path), doctest::Contains("not valid JSON"), Error);
  }
  SUBCASE("oversized offsets") {
    write_bytes(path, with_header(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,800]}})", 8));
    CHECK_THROWS_WITH_AS(load_safetensors(path), doctest::Contains("tensor 'w'"), Error);
  }
  SUBCASE("size does not match shape") {
    write_bytes(path, with_header(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8));
    CHECK_THROWS_WITH_AS(load_safetensors(path), doctest::Contains("needs 12"), Error);
  }
  SUBCASE("unknown dtype") {
    write_bytes(path, with_header(R"({"w":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", 8));
    CHECK_THROWS_WITH_AS(load_safetensors(path), doctest::Contains("unsupported dtype 'Q7'"), Error);
  }
  SUBCASE("overlapping tensors") {
    write_bytes(path, with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12));
    CHECK_THROWS_WITH_AS(load_safetensors(path), doctest::Contains("overlap"), Error);
  }
  SUBCASE("missing file") {
    std::remove(path.c_str());
    CHECK_THROWS_WITH_AS(load_safetensors(path), doctest::Contains("cannot open"), Error);
  }
  SUBCASE("a folder") {
    const std::string dir = tmp_path("folder.safetensors");
    std::filesystem::create_directories(dir);
    CHECK_THROWS_WITH_AS(load_safetensors(dir), doctest::Contains("is a folder"), Error);
    std::filesystem::remove_all(dir);
  }
  std::remove(path.c_str());
}

TEST_CASE("safetensors writes atomically: a failed save keeps the old file") {
  const std::string path = tmp_path("atomic.safetensors");
  save_safetensors(path, {{"w", Tensor::from({1, 2}, {2})}});
  CHECK_THROWS_AS(save_safetensors(path, {{"__metadata__", Tensor::zeros({1})}}), Error);
  CHECK(load_safetensors(path).at("w").to_vector<float>() == std::vector<float>{1, 2});
  std::remove(path.c_str());
}
