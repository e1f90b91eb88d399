#include "report/pictures.h"

#include <algorithm>
#include <cmath>

#include "report/routing_maps.h"

namespace mv::report {

// ---- patches --------------------------------------------------------------------------------

namespace {

void check_canvas(const RgbImage& img, int grid, int cell, size_t values, const char* what) {
  MV_CHECK(grid >= 1 && cell >= 1 && img.width == grid * cell && img.height == grid * cell, what,
           ": image ", img.width, " x ", img.height, " is not ", grid, " x ", grid, " patches of ",
           cell, " pixels");
  MV_CHECK(values == size_t(grid) * size_t(grid), what, ": ", values, " patch values for a ", grid,
           " x ", grid, " grid, expected ", grid * grid);
}

// Calls f(x, y, i, j) for every pixel of patch p, (i, j) its position inside the patch.
template <class F>
void for_patch_pixels(int grid, int cell, int p, F&& f) {
  const int y0 = (p / grid) * cell, x0 = (p % grid) * cell;
  for (int i = 0; i < cell; ++i)
    for (int j = 0; j < cell; ++j) f(x0 + j, y0 + i, i, j);
}

}  // namespace

RgbImage upscale_image(const float* chw, int channels, int size, const datasets::Normalize& norm,
                       int scale) {
  MV_CHECK(channels == 1 || channels == 3, "upscale_image: ", channels,
           " channels, expected 1 (grey) or 3 (RGB)");
  MV_CHECK(size >= 1 && scale >= 1, "upscale_image: size ", size, " and scale ", scale,
           " must be positive");
  MV_CHECK(!norm.enabled() || (int(norm.mean.size()) == channels && int(norm.std.size()) == channels),
           "upscale_image: normalisation has ", norm.mean.size(), " channels, the image ", channels);
  RgbImage img(size * scale, size * scale);
  const int64_t plane = int64_t(size) * size;
  for (int y = 0; y < size; ++y)
    for (int x = 0; x < size; ++x) {
      uint8_t v[3];
      for (int c = 0; c < channels; ++c) {
        double u = chw[c * plane + int64_t(y) * size + x];
        if (norm.enabled()) u = u * norm.std[size_t(c)] + norm.mean[size_t(c)];
        v[c] = to_byte(u * 255.0);
      }
      const Rgb px = channels == 1 ? Rgb{v[0], v[0], v[0]} : Rgb{v[0], v[1], v[2]};
      for (int i = 0; i < scale; ++i)
        for (int j = 0; j < scale; ++j) img.set(x * scale + j, y * scale + i, px);
    }
  return img;
}

void tint_patches(RgbImage& img, int grid, int cell, const std::vector<int>& labels,
                  const std::vector<Rgb>& palette, float alpha) {
  check_canvas(img, grid, cell, labels.size(), "tint_patches");
  for (int p = 0; p < grid * grid; ++p) {
    const int l = labels[size_t(p)];
    if (l < 0) continue;
    MV_CHECK(size_t(l) < palette.size(), "tint_patches: label ", l, " has no colour (palette of ",
             palette.size(), ")");
    for_patch_pixels(grid, cell, p, [&](int x, int y, int, int) {
      img.set(x, y, blend(img.at(x, y), palette[size_t(l)], alpha));
    });
  }
}

void outline_patches(RgbImage& img, int grid, int cell, const std::vector<uint8_t>& mask,
                     Rgb colour, int thickness) {
  check_canvas(img, grid, cell, mask.size(), "outline_patches");
  MV_CHECK(thickness >= 1, "outline_patches: thickness ", thickness, " must be at least 1");
  const int t = std::min(thickness, (cell + 1) / 2);
  for (int p = 0; p < grid * grid; ++p) {
    if (!mask[size_t(p)]) continue;
    for_patch_pixels(grid, cell, p, [&](int x, int y, int i, int j) {
      if (std::min({i, j, cell - 1 - i, cell - 1 - j}) < t) img.set(x, y, colour);
    });
  }
}

void grey_patches(RgbImage& img, int grid, int cell, const std::vector<uint8_t>& mask) {
  check_canvas(img, grid, cell, mask.size(), "grey_patches");
  const int period = std::max(4, cell / 4), line = std::max(1, period / 4);
  for (int p = 0; p < grid * grid; ++p) {
    if (!mask[size_t(p)]) continue;
    for_patch_pixels(grid, cell, p, [&](int x, int y, int i, int j) {
      if ((i + j) % period < line) {
        img.set(x, y, {70, 70, 70});
      } else {  // faded grey: the image stays faintly visible, the tint is gone
        const Rgb c = img.at(x, y);
        const uint8_t v = to_byte(0.35 * (0.299 * c.r + 0.587 * c.g + 0.114 * c.b) + 0.65 * 170);
        img.set(x, y, {v, v, v});
      }
    });
  }
}

void heat_patches(RgbImage& img, int grid, int cell, const std::vector<float>& v, float alpha) {
  check_canvas(img, grid, cell, v.size(), "heat_patches");
  for (int p = 0; p < grid * grid; ++p) {
    const Rgb h = heat_colour(v[size_t(p)]);
    for_patch_pixels(grid, cell, p, [&](int x, int y, int, int) {
      img.set(x, y, blend(img.at(x, y), h, alpha));
    });
  }
}

// ---- the pictures ---------------------------------------------------------------------------

namespace {

struct Layout {
  int64_t B = 0;
  int C = 0, S = 0, grid = 0, cell = 0, P = 0;
  Tensor x;  // contiguous CPU images
};

Layout layout(const Tensor& images, int patch, const PictureStyle& s, const char* what) {
  MV_CHECK(images.defined() && images.ndim() == 4 && images.size(2) == images.size(3), what,
           ": images ", images.defined() ? images.str() : std::string("undefined"),
           " must be (B, C, S, S)");
  MV_CHECK(patch >= 1 && images.size(2) % patch == 0, what, ": patch ", patch,
           " does not divide the image size ", images.size(2));
  MV_CHECK(s.scale >= 1 && s.columns >= 1 && s.gap >= 0 && s.pair_gap >= 0, what,
           ": style needs scale >= 1, columns >= 1 and gaps >= 0");
  Layout l;
  l.x = images.to(Device::CPU).contiguous();
  l.B = images.size(0), l.C = int(images.size(1)), l.S = int(images.size(2));
  l.grid = l.S / patch, l.cell = patch * s.scale, l.P = l.grid * l.grid;
  return l;
}

RgbImage base_image(const Layout& l, int64_t b, const datasets::Normalize& norm, int scale) {
  return upscale_image(l.x.data<float>() + b * l.C * l.S * l.S, l.C, l.S, norm, scale);
}

template <class T>
std::vector<T> slice(const std::vector<T>& v, int64_t b, int64_t P) {
  return std::vector<T>(v.begin() + b * P, v.begin() + (b + 1) * P);
}

std::vector<uint8_t> negate(std::vector<uint8_t> m) {
  for (auto& x : m) x = !x;
  return m;
}

int experts_of(const models::Route& r) {
  MV_CHECK(r.probs.defined() && r.probs.ndim() == 3, "routing picture: the route has no (G, N, E) "
           "probabilities");
  return int(r.probs.size(2));
}

}  // namespace

RgbImage expert_map_picture(const Tensor& images, const datasets::Normalize& norm, int patch,
                            const models::Route& r, const PictureStyle& s) {
  const Layout l = layout(images, patch, s, "expert map");
  const std::vector<int> top = patch_top1_experts(r, l.B);
  MV_CHECK(int64_t(top.size()) == l.B * l.P, "expert map: the route has ", top.size() / size_t(l.B),
           " patches per image, the images ", l.P);
  const std::vector<Rgb> pal = expert_palette(experts_of(r));
  std::vector<RgbImage> cells;
  for (int64_t b = 0; b < l.B; ++b) {
    RgbImage img = base_image(l, b, norm, s.scale);
    tint_patches(img, l.grid, l.cell, slice(top, b, l.P), pal, s.alpha);
    cells.push_back(std::move(img));
  }
  return tile(cells, s.columns, s.gap);
}

NoisePicture noise_picture(const Tensor& clean, const Tensor& noisy,
                           const datasets::Normalize& norm, int patch,
                           const models::Route& r_clean, const models::Route& r_noisy,
                           const PictureStyle& s) {
  const Layout lc = layout(clean, patch, s, "noise picture"), ln = layout(noisy, patch, s, "noise picture");
  MV_CHECK(clean.shape() == noisy.shape(), "noise picture: clean ", clean.str(), " and noisy ",
           noisy.str(), " images differ in shape");
  const std::vector<int> a = patch_top1_experts(r_clean, lc.B), b = patch_top1_experts(r_noisy, lc.B);
  MV_CHECK(int64_t(a.size()) == lc.B * lc.P, "noise picture: the route has ",
           a.size() / size_t(lc.B), " patches per image, the images ", lc.P);
  const std::vector<uint8_t> ch = changed_patches(a, b);
  const std::vector<Rgb> pal = expert_palette(experts_of(r_clean));
  const int thick = s.outline > 0 ? s.outline : std::max(1, s.scale / 4);
  NoisePicture out;
  std::vector<RgbImage> pairs;
  for (int64_t i = 0; i < lc.B; ++i) {
    const std::vector<uint8_t> m = slice(ch, i, lc.P);
    RgbImage u = base_image(lc, i, norm, s.scale), v = base_image(ln, i, norm, s.scale);
    tint_patches(u, lc.grid, lc.cell, slice(a, i, lc.P), pal, s.alpha);
    tint_patches(v, lc.grid, lc.cell, slice(b, i, lc.P), pal, s.alpha);
    outline_patches(u, lc.grid, lc.cell, m, kRed, thick);
    outline_patches(v, lc.grid, lc.cell, m, kRed, thick);
    pairs.push_back(hstack({u, v}, s.pair_gap));
  }
  for (uint8_t c : ch) out.changed += c;
  out.patches = int64_t(ch.size());
  out.image = tile(pairs, s.columns, s.gap);
  return out;
}

CapacityPicture capacity_picture(const Tensor& images, const datasets::Normalize& norm, int patch,
                                 const models::Route& r_plain, const models::Route& r_bpr,
                                 const PictureStyle& s) {
  const Layout l = layout(images, patch, s, "capacity picture");
  const std::vector<int> top = patch_top1_experts(r_plain, l.B);
  MV_CHECK(int64_t(top.size()) == l.B * l.P, "capacity picture: the route has ",
           top.size() / size_t(l.B), " patches per image, the images ", l.P);
  const std::vector<uint8_t> kp = patch_top1_kept(r_plain, l.B), kb = patch_top1_kept(r_bpr, l.B);
  const std::vector<Rgb> pal = expert_palette(experts_of(r_plain));
  CapacityPicture out;
  std::vector<RgbImage> pairs;
  for (int64_t b = 0; b < l.B; ++b) {
    std::vector<RgbImage> halves;
    for (const std::vector<uint8_t>* kept : {&kp, &kb}) {
      RgbImage img = base_image(l, b, norm, s.scale);
      tint_patches(img, l.grid, l.cell, slice(top, b, l.P), pal, s.alpha);
      grey_patches(img, l.grid, l.cell, negate(slice(*kept, b, l.P)));
      halves.push_back(std::move(img));
    }
    pairs.push_back(hstack(halves, s.pair_gap));
  }
  for (size_t i = 0; i < kp.size(); ++i) out.kept_plain += kp[i], out.kept_bpr += kb[i];
  out.patches = int64_t(kp.size());
  out.image = tile(pairs, s.columns, s.gap);
  return out;
}

RgbImage soft_picture(const Tensor& images, const datasets::Normalize& norm, int patch,
                      const models::Route& r, int64_t slot, const PictureStyle& s) {
  const Layout l = layout(images, patch, s, "soft picture");
  const std::vector<float> w = soft_slot_weights(r, l.B, slot);
  MV_CHECK(int64_t(w.size()) == l.B * l.P, "soft picture: the route has ", w.size() / size_t(l.B),
           " patches per image, the images ", l.P);
  std::vector<RgbImage> cells;
  for (int64_t b = 0; b < l.B; ++b) {
    RgbImage img = base_image(l, b, norm, s.scale);
    heat_patches(img, l.grid, l.cell, normalize_min_max(slice(w, b, l.P)), std::max(s.alpha, 0.6f));
    cells.push_back(std::move(img));
  }
  return tile(cells, s.columns, s.gap);
}
}  // namespace mv::report
