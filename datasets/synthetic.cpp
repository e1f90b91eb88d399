#include "datasets/synthetic.h"

#include <algorithm>
#include <cmath>

#include "engine/error.h"
#include "engine/parallel.h"
#include "engine/philox.h"

namespace mv::datasets {

Dataset make_synthetic(int64_t n, int channels, int size, int classes, uint64_t seed) {
  MV_CHECK(n >= 0 && channels > 0 && size > 0 && classes > 0, "make_synthetic: bad arguments n=",
           n, " channels=", channels, " size=", size, " classes=", classes);
  constexpr int kWaves = 3;
  constexpr float kTwoPi = 6.2831853071795864f;
  const int64_t hw = int64_t(size) * size, pix = channels * hw;

  // Philox stream layout (counter blocks): class patterns, then one block per image for its
  // shift, then the noise of image i at its own range, so images can be drawn in parallel.
  const uint64_t pattern_off = 0, pattern_blocks = uint64_t(classes) * channels * kWaves;
  const uint64_t shift_off = pattern_off + pattern_blocks;
  const uint64_t noise_off = shift_off + uint64_t(n), noise_blocks = uint64_t(pix + 1) / 2;

  // Class patterns in [-1, 1]: waves with integer frequencies 0..2 (not both 0), so they tile
  // and a cyclic shift keeps them smooth.
  std::vector<float> pattern(size_t(classes * pix));
  for (int c = 0; c < classes; ++c)
    for (int ch = 0; ch < channels; ++ch) {
      float* p = pattern.data() + c * pix + ch * hw;
      float amp_sum = 0;
      for (int k = 0; k < kWaves; ++k) {
        const philox::U4 b = philox::block(seed, pattern_off + uint64_t((c * channels + ch) * kWaves + k));
        int fy = int(b.x % 3), fx = int(b.y % 3);
        if (fy == 0 && fx == 0) fx = 1;
        const float amp = 0.5f + 0.5f * philox::to_unit(b.z);
        const float phase = kTwoPi * philox::to_unit(b.w);
        amp_sum += amp;
        for (int y = 0; y < size; ++y)
          for (int x = 0; x < size; ++x)
            p[y * size + x] += amp * std::cos(kTwoPi * float(fy * y + fx * x) / float(size) + phase);
      }
      for (int64_t i = 0; i < hw; ++i) p[i] /= amp_sum;
    }

  Dataset d;
  d.name = "synthetic";
  d.n = n;
  d.channels = channels;
  d.height = d.width = size;
  d.num_classes = classes;
  d.pixels.resize(size_t(n * pix));
  d.labels.resize(size_t(n));
  for (int c = 0; c < classes; ++c) d.class_names.push_back("class" + std::to_string(c));

  const int max_shift = size / 8;
  parallel_for(n, pix * 40, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int label = int(i % classes);
      d.labels[size_t(i)] = label;
      const philox::U4 s = philox::block(seed, shift_off + uint64_t(i));
      const int dy = int(s.x % uint32_t(2 * max_shift + 1)) - max_shift;
      const int dx = int(s.y % uint32_t(2 * max_shift + 1)) - max_shift;
      const float* p = pattern.data() + label * pix;
      uint8_t* out = d.pixels.data() + i * pix;
      const uint64_t off = noise_off + uint64_t(i) * noise_blocks;
      for (int ch = 0; ch < channels; ++ch)
        for (int y = 0; y < size; ++y)
          for (int x = 0; x < size; ++x) {
            const int sy = ((y - dy) % size + size) % size, sx = ((x - dx) % size + size) % size;
            const int64_t j = ch * hw + y * size + x;
            const float v = 128.f + 80.f * p[ch * hw + sy * size + sx] +
                            24.f * philox::normal(seed, off, uint64_t(j));
            out[j] = uint8_t(std::clamp(std::lround(v), 0L, 255L));
          }
    }
  });
  return d;
}

}  // namespace mv::datasets
