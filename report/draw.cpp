#include "report/draw.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "engine/error.h"
#include "engine/file_write.h"

// The one definition of stb_image_write in the project; stb_easy_font (Debian's libstb-dev,
// header-only, all static): a tiny vector font for the plots.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#include <stb/stb_easy_font.h>
#pragma GCC diagnostic pop

namespace mv::report {

// ---- images and colours ---------------------------------------------------------------------

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

uint8_t to_byte(double v) { return uint8_t(std::lround(std::clamp(v, 0.0, 255.0))); }

Rgb blend(Rgb a, Rgb b, float alpha) {
  return {to_byte(a.r + alpha * (double(b.r) - a.r)), to_byte(a.g + alpha * (double(b.g) - a.g)),
          to_byte(a.b + alpha * (double(b.b) - a.b))};
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

// ---- shapes and text ------------------------------------------------------------------------

void fill_rect(RgbImage& img, int x0, int y0, int x1, int y1, Rgb c) {
  for (int y = std::max(y0, 0); y < std::min(y1, img.height); ++y)
    for (int x = std::max(x0, 0); x < std::min(x1, img.width); ++x) img.set(x, y, c);
}

void draw_line(RgbImage& img, float x0, float y0, float x1, float y1, Rgb c, bool dashed) {
  const int n = int(std::ceil(std::max(std::fabs(x1 - x0), std::fabs(y1 - y0)))) + 1;
  for (int i = 0; i <= n; ++i) {
    if (dashed && (i / 6) % 2) continue;
    const float t = float(i) / float(n);
    const int x = int(std::lround(x0 + t * (x1 - x0))), y = int(std::lround(y0 + t * (y1 - y0)));
    fill_rect(img, x - 1, y - 1, x + 1, y + 1, c);
  }
}

// stb_easy_font draws quads (axis-aligned rectangles); each is filled, scaled.
void draw_text(RgbImage& img, float x, float y, const std::string& s, Rgb c, float scale) {
  std::vector<float> vbuf(16 * 1024);  // 4 vertices of 4 words (x, y, z, colour) per quad
  std::vector<char> str(s.begin(), s.end());
  str.push_back('\0');
  const int quads = stb_easy_font_print(0, 0, str.data(), nullptr, vbuf.data(),
                                        int(vbuf.size() * sizeof(float)));
  for (int q = 0; q < quads; ++q) {
    const float* v0 = &vbuf[size_t(q) * 16];      // top left
    const float* v2 = &vbuf[size_t(q) * 16 + 8];  // bottom right
    fill_rect(img, int(x + v0[0] * scale), int(y + v0[1] * scale), int(x + v2[0] * scale),
              int(y + v2[1] * scale), c);
  }
}

int text_width(const std::string& s, float scale) {
  std::vector<char> str(s.begin(), s.end());
  str.push_back('\0');
  return int(float(stb_easy_font_width(str.data())) * scale);
}

// ---- layout ---------------------------------------------------------------------------------

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

// ---- PNG ------------------------------------------------------------------------------------

void write_png(const std::string& path, int w, int h, const std::vector<uint8_t>& rgb) {
  MV_CHECK(w > 0 && h > 0, "write_png: '", path, "': image size ", w, " x ", h,
           " must be positive");
  MV_CHECK(rgb.size() == size_t(w) * size_t(h) * 3, "write_png: '", path, "': ", rgb.size(),
           " bytes for a ", w, " x ", h, " RGB image, expected ", size_t(w) * size_t(h) * 3);
  // Encoded in memory, then written by the one checked writer: a full disk fails the program
  // instead of leaving a truncated picture.
  std::string png;
  auto append = [](void* out, void* data, int n) {
    static_cast<std::string*>(out)->append(static_cast<const char*>(data), size_t(n));
  };
  MV_CHECK(stbi_write_png_to_func(append, &png, w, h, 3, rgb.data(), w * 3) != 0,
           "write_png: cannot encode '", path, "'");
  write_file(path, png);
}

}  // namespace mv::report
