#include "models/routing_maps.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "autograd/autograd.h"
#include "engine/random.h"
#include "ops/shape.h"
#include "ops/softmax.h"

namespace mv::models {

// ---- per-patch maps -------------------------------------------------------------------------

namespace {

// Tokens per image of a route over `images` images; checks that the route splits evenly.
int64_t tokens_per_image(const Tensor& t, int64_t images, const char* what) {
  MV_CHECK(t.defined() && t.ndim() == 3, what, ": expected a (G, N, ...) routing tensor, got ",
           t.defined() ? t.str() : std::string("an undefined tensor"));
  const int64_t flat = t.size(0) * t.size(1);
  MV_CHECK(images >= 1 && flat % images == 0 && flat / images >= 2, what, ": ", t.str(),
           " does not split into ", images, " images of a CLS token and at least one patch");
  return flat / images;
}

}  // namespace

std::vector<int> patch_top1_experts(const Route& r, int64_t images) {
  const int64_t T = tokens_per_image(r.probs, images, "patch_top1_experts"), P = T - 1;
  const int64_t E = r.probs.size(2);
  const std::vector<float> p = r.probs.to_vector<float>();
  std::vector<int> out(size_t(images * P));
  for (int64_t b = 0; b < images; ++b)
    for (int64_t q = 0; q < P; ++q) {
      const float* row = p.data() + (b * T + q + 1) * E;  // + 1: skip the CLS token
      out[size_t(b * P + q)] = int(std::max_element(row, row + E) - row);  // first max wins
    }
  return out;
}

std::vector<uint8_t> patch_top1_kept(const Route& r, int64_t images) {
  MV_CHECK(r.slot.defined(), "patch_top1_kept: the route has no slots: only token-choice routers "
           "(topk, cosine, perturbed_cosine, multi_centroid) keep or drop a token's choices");
  const int64_t T = tokens_per_image(r.slot, images, "patch_top1_kept"), P = T - 1;
  const int64_t K = r.slot.size(2);
  const std::vector<int64_t> s = r.slot.to_vector<int64_t>();
  std::vector<uint8_t> out(size_t(images * P));
  for (int64_t b = 0; b < images; ++b)
    for (int64_t q = 0; q < P; ++q) out[size_t(b * P + q)] = s[size_t((b * T + q + 1) * K)] >= 0;
  return out;
}

std::vector<float> soft_slot_weights(const Route& r, int64_t images, int64_t slot) {
  MV_CHECK(r.soft_logits.defined(), "soft_slot_weights: the route has no soft logits: only a "
           "Soft MoE router (soft) dispatches tokens into slots");
  const Tensor& L = r.soft_logits;
  const int64_t T = tokens_per_image(L, images, "soft_slot_weights"), P = T - 1;
  const int64_t S = L.size(2);
  MV_CHECK(slot >= 0 && slot < S, "soft_slot_weights: slot ", slot, " out of range: the router has ",
           S, " slots (experts x slots per expert), expected 0..", S - 1);
  // Dispatch: per group, a softmax over its N tokens of the slot's logits -> (G, 1, N).
  const std::vector<float> w =
      ops::softmax(ops::transpose(ops::slice(L.to(Device::CPU), 2, slot, slot + 1), 1, 2))
          .to_vector<float>();
  std::vector<float> out(size_t(images * P));
  for (int64_t b = 0; b < images; ++b)
    for (int64_t q = 0; q < P; ++q) out[size_t(b * P + q)] = w[size_t(b * T + q + 1)];
  return out;
}

std::vector<float> normalize_min_max(const std::vector<float>& v) {
  std::vector<float> out(v.size(), 0.f);
  if (v.empty()) return out;
  const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  const double a = *lo, range = double(*hi) - a;
  if (!(range > 0)) return out;
  for (size_t i = 0; i < v.size(); ++i) out[i] = float((double(v[i]) - a) / range);
  return out;
}

std::vector<uint8_t> changed_patches(const std::vector<int>& a, const std::vector<int>& b) {
  MV_CHECK(a.size() == b.size(), "changed_patches: maps of ", a.size(), " and ", b.size(),
           " patches, expected the same number");
  std::vector<uint8_t> out(a.size());
  for (size_t i = 0; i < a.size(); ++i) out[i] = a[i] != b[i];
  return out;
}

// ---- images and drawing ---------------------------------------------------------------------

RgbImage::RgbImage(int w, int h, Rgb fill) : width(w), height(h) {
  MV_CHECK(w >= 0 && h >= 0, "RgbImage: size ", w, " x ", h, " must not be negative");
  rgb.resize(size_t(w) * size_t(h) * 3);
  for (size_t i = 0; i < rgb.size(); i += 3) rgb[i] = fill.r, rgb[i + 1] = fill.g, rgb[i + 2] = fill.b;
}

Rgb RgbImage::at(int x, int y) const {
  const uint8_t* p = rgb.data() + (size_t(y) * size_t(width) + size_t(x)) * 3;
  return {p[0], p[1], p[2]};
}

void RgbImage::set(int x, int y, Rgb c) {
  uint8_t* p = rgb.data() + (size_t(y) * size_t(width) + size_t(x)) * 3;
  p[0] = c.r, p[1] = c.g, p[2] = c.b;
}

namespace {

struct Named {
  const char* name;
  Rgb c;
};
// Hand-picked: saturated and far apart; no red (changes are drawn in red) and no grey (dropped).
constexpr Named kFixed[] = {
    {"blue", {0, 114, 230}},     {"orange", {255, 150, 0}},   {"green", {0, 170, 60}},
    {"purple", {140, 60, 200}},  {"yellow", {255, 230, 0}},   {"cyan", {0, 210, 230}},
    {"magenta", {230, 0, 200}},  {"brown", {140, 80, 20}},    {"lime", {170, 255, 60}},
    {"navy", {20, 30, 120}},     {"pink", {255, 160, 200}},   {"teal", {0, 128, 128}},
    {"olive", {110, 140, 0}},    {"lavender", {190, 170, 255}}, {"mint", {150, 255, 200}},
    {"sky", {120, 190, 255}},
};
constexpr int kFixedCount = int(sizeof(kFixed) / sizeof(kFixed[0]));

// Past the fixed list: hues 30..330 degrees (away from red) spread by the golden ratio, so each
// new one falls in the widest gap left; saturation and value alternate too.
double generated_hue(int i) {
  const double f = double(i - kFixedCount) * 0.6180339887498949;
  return 30.0 + 300.0 * (f - std::floor(f));
}

Rgb hsv(double h, double s, double v) {
  const double c = v * s, hp = h / 60.0, x = c * (1 - std::fabs(std::fmod(hp, 2.0) - 1)), m = v - c;
  double r = 0, g = 0, b = 0;
  if (hp < 1) r = c, g = x;
  else if (hp < 2) r = x, g = c;
  else if (hp < 3) g = c, b = x;
  else if (hp < 4) g = x, b = c;
  else if (hp < 5) r = x, b = c;
  else r = c, b = x;
  auto q = [&](double u) { return uint8_t(std::lround(std::clamp(u + m, 0.0, 1.0) * 255)); };
  return {q(r), q(g), q(b)};
}

uint8_t to_byte(double v) { return uint8_t(std::lround(std::clamp(v, 0.0, 255.0))); }

Rgb blend(Rgb a, Rgb b, float alpha) {
  return {to_byte(a.r + alpha * (double(b.r) - a.r)), to_byte(a.g + alpha * (double(b.g) - a.g)),
          to_byte(a.b + alpha * (double(b.b) - a.b))};
}

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

std::vector<Rgb> expert_palette(int experts) {
  MV_CHECK(experts >= 0, "expert_palette: ", experts, " experts");
  std::vector<Rgb> out;
  for (int i = 0; i < experts; ++i)
    out.push_back(i < kFixedCount ? kFixed[i].c
                                  : hsv(generated_hue(i), (i % 2) ? 0.95 : 0.6, ((i / 2) % 2) ? 0.7 : 1.0));
  return out;
}

std::string colour_name(int expert) {
  if (expert >= 0 && expert < kFixedCount) return kFixed[expert].name;
  return "hue " + std::to_string(int(std::lround(generated_hue(expert))));
}

std::string hex(Rgb c) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", c.r, c.g, c.b);
  return buf;
}

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

Rgb heat_colour(float t) {
  struct Stop {
    float t;
    Rgb c;
  };
  static constexpr Stop stops[] = {{0.f, {12, 8, 40}},      {0.3f, {110, 20, 120}},
                                   {0.6f, {225, 60, 40}},   {0.85f, {250, 175, 30}},
                                   {1.f, {255, 250, 190}}};
  t = std::isnan(t) ? 0.f : std::clamp(t, 0.f, 1.f);
  for (size_t i = 1; i < std::size(stops); ++i)
    if (t <= stops[i].t)
      return blend(stops[i - 1].c, stops[i].c, (t - stops[i - 1].t) / (stops[i].t - stops[i - 1].t));
  return stops[std::size(stops) - 1].c;
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

namespace {
// Copies src into dst with its top-left corner at (x0, y0).
void paste(RgbImage& dst, const RgbImage& src, int x0, int y0) {
  for (int y = 0; y < src.height; ++y)
    std::copy_n(src.rgb.data() + size_t(y) * src.width * 3, size_t(src.width) * 3,
                dst.rgb.data() + (size_t(y0 + y) * dst.width + x0) * 3);
}
}  // namespace

RgbImage hstack(const std::vector<RgbImage>& images, int gap, Rgb background) {
  MV_CHECK(!images.empty() && gap >= 0, "hstack: ", images.size(), " images, gap ", gap);
  int w = gap * int(images.size() - 1), h = 0;
  for (const RgbImage& im : images) w += im.width, h = std::max(h, im.height);
  RgbImage out(w, h, background);
  int x = 0;
  for (const RgbImage& im : images) paste(out, im, x, 0), x += im.width + gap;
  return out;
}

RgbImage tile(const std::vector<RgbImage>& images, int columns, int gap, Rgb background) {
  MV_CHECK(!images.empty() && columns >= 1 && gap >= 0, "tile: ", images.size(), " images, ",
           columns, " columns, gap ", gap);
  const int w = images[0].width, h = images[0].height, n = int(images.size());
  for (const RgbImage& im : images)
    MV_CHECK(im.width == w && im.height == h, "tile: images of ", w, " x ", h, " and ", im.width,
             " x ", im.height, ", expected one size");
  const int cols = std::min(columns, n), rows = (n + cols - 1) / cols;
  RgbImage out(cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap, background);
  for (int i = 0; i < n; ++i) paste(out, images[size_t(i)], (i % cols) * (w + gap), (i / cols) * (h + gap));
  return out;
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

int experts_of(const Route& r) {
  MV_CHECK(r.probs.defined() && r.probs.ndim() == 3, "routing picture: the route has no (G, N, E) "
           "probabilities");
  return int(r.probs.size(2));
}

}  // namespace

RgbImage expert_map_picture(const Tensor& images, const datasets::Normalize& norm, int patch,
                            const Route& r, const PictureStyle& s) {
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
                           const datasets::Normalize& norm, int patch, const Route& r_clean,
                           const Route& r_noisy, const PictureStyle& s) {
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
                                 const Route& r_plain, const Route& r_bpr, const PictureStyle& s) {
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
                      const Route& r, int64_t slot, const PictureStyle& s) {
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

// ---- running the model ----------------------------------------------------------------------

Tensor dataset_images(const datasets::Dataset& d, int64_t first, int64_t count,
                      const datasets::Normalize& norm) {
  MV_CHECK(first >= 0 && first < d.n, "images: first index ", first, " is outside data set '",
           d.name, "' of ", d.n, " images");
  MV_CHECK(count >= 1, "images: count ", count, " must be at least 1");
  count = std::min(count, d.n - first);
  MV_CHECK(!norm.enabled() || int64_t(norm.mean.size()) == d.channels, "images: normalisation for ",
           norm.mean.size(), " channels, data set '", d.name, "' has ", d.channels);
  Tensor x = Tensor::empty({count, d.channels, d.height, d.width});
  float* p = x.data<float>();
  const int64_t plane = d.height * d.width;
  for (int64_t b = 0; b < count; ++b) {
    const uint8_t* src = d.image(first + b);
    for (int64_t c = 0; c < d.channels; ++c)
      for (int64_t i = 0; i < plane; ++i) {
        float v = src[c * plane + i] / 255.f;
        if (norm.enabled()) v = (v - norm.mean[size_t(c)]) / norm.std[size_t(c)];
        p[(b * d.channels + c) * plane + i] = v;
      }
  }
  return x;
}

Tensor add_pixel_noise(const Tensor& images, float sigma, uint64_t seed) {
  MV_CHECK(sigma >= 0 && std::isfinite(sigma), "pixel noise: sigma ", sigma, " must be >= 0");
  Generator g(seed);
  Tensor out = images.to(Device::CPU).clone();
  const Tensor eps = randn(out.shape(), g);
  float* o = out.data<float>();
  const float* e = eps.data<float>();
  for (int64_t i = 0, n = out.numel(); i < n; ++i) o[i] += sigma * e[i];
  return out;
}

std::vector<Route> route_images(ViT& model, const Tensor& images) {
  MV_CHECK(!model.moe_layers().empty(), "routing pictures: the model has no MoE layer (a dense "
           "ViT); use a checkpoint of an MoE model");
  autograd::NoGrad no_grad;
  const bool was_training = model.training();
  model.train(false);
  model.forward(images.to(model.device()));
  model.train(was_training);
  std::vector<Route> out;
  for (MoELayer* m : model.moe_layers()) {
    const Route& r = m->last;
    Route c;  // what the pictures read, on the CPU
    auto cpu = [](const Tensor& t) { return t.defined() ? t.to(Device::CPU) : Tensor(); };
    c.probs = cpu(r.probs), c.expert = cpu(r.expert), c.slot = cpu(r.slot);
    c.soft_logits = cpu(r.soft_logits);
    c.capacity = r.capacity;
    out.push_back(std::move(c));
  }
  return out;
}

std::pair<std::vector<Route>, std::vector<Route>> route_with_and_without_bpr(
    ViT& model, const Tensor& images, float capacity) {
  MV_CHECK(capacity > 0 && std::isfinite(capacity), "capacity picture: capacity factor ", capacity,
           " must be positive");
  const std::vector<MoELayer*> layers = model.moe_layers();
  MV_CHECK(!layers.empty(), "capacity picture: the model has no MoE layer");
  for (MoELayer* m : layers)
    MV_CHECK(m->router->config.token_choice(), "capacity picture: router '",
             m->router->config.type, "' does not drop tokens by capacity per token choice; it needs "
             "a token-choice router (topk, cosine, perturbed_cosine, multi_centroid)");
  std::vector<RouterConfig> saved;
  for (MoELayer* m : layers) saved.push_back(m->router->config);
  auto set = [&](bool bpr) {
    for (MoELayer* m : layers) m->router->config.capacity_eval = capacity, m->router->config.bpr = bpr;
  };
  auto restore = [&] {
    for (size_t i = 0; i < layers.size(); ++i) layers[i]->router->config = saved[i];
  };
  std::pair<std::vector<Route>, std::vector<Route>> out;
  try {
    set(false);
    out.first = route_images(model, images);
    set(true);
    out.second = route_images(model, images);
  } catch (...) {
    restore();
    throw;
  }
  restore();
  return out;
}

}  // namespace mv::models
