// Drawing for the reports: RGB images, colours, rectangles, lines and text (stb_easy_font's
// bitmap font), side-by-side and grid layouts, and PNG files (stb_image_write). Both stb
// implementations live in report/draw.cpp only, so every other file includes this header instead.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mv::report {

// ---- images and colours ---------------------------------------------------------------------

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb&) const = default;
};
inline constexpr Rgb kRed{255, 0, 0};      // changed routing
inline constexpr Rgb kWhite{255, 255, 255};
inline constexpr Rgb kBlack{0, 0, 0};

struct RgbImage {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height rows of width pixels, 3 bytes each, top row first
  RgbImage() = default;
  RgbImage(int w, int h, Rgb fill = kWhite);
  Rgb at(int x, int y) const;
  void set(int x, int y, Rgb c);
};

// v rounded to the nearest of 0..255 (clamped).
uint8_t to_byte(double v);
// a + alpha (b - a) per channel: alpha 0 gives a, 1 gives b.
Rgb blend(Rgb a, Rgb b, float alpha);
// `experts` distinct colours: a fixed list of 16 named ones, then golden-ratio hues. None is
// close to red (kRed marks changes) or to grey (dropped patches).
std::vector<Rgb> expert_palette(int experts);
std::string colour_name(int expert);  // "blue", ... ("hue 137" past the fixed list)
std::string hex(Rgb c);               // "#0072e6"
// A dark-to-bright colour ramp: 0 -> near black (blue tint), 0.5 -> red-orange, 1 -> pale yellow.
Rgb heat_colour(float t);

// ---- shapes and text ------------------------------------------------------------------------

// Fills [x0, x1) x [y0, y1), clipped to the image.
void fill_rect(RgbImage& img, int x0, int y0, int x1, int y1, Rgb c);
// A line 2 px thick; dashed: 6 px on, 6 px off.
void draw_line(RgbImage& img, float x0, float y0, float x1, float y1, Rgb c, bool dashed = false);
// Text in stb_easy_font's bitmap font, scaled; (x, y) is its top left.
void draw_text(RgbImage& img, float x, float y, const std::string& s, Rgb c, float scale = 1.f);
// The width in pixels that draw_text gives s.
int text_width(const std::string& s, float scale = 1.f);

// ---- layout ---------------------------------------------------------------------------------

// Images side by side (tops aligned) with `gap` background pixels between them.
RgbImage hstack(const std::vector<RgbImage>& images, int gap, Rgb background = kWhite);
// Images of one size in rows of `columns` (the last row may be shorter), `gap` pixels between.
RgbImage tile(const std::vector<RgbImage>& images, int columns, int gap, Rgb background = kWhite);

// ---- PNG ------------------------------------------------------------------------------------

// rgb: h rows of w pixels, 3 bytes (R, G, B) each, top row first. Throws mv::Error naming the
// path when the sizes disagree or the file cannot be written.
void write_png(const std::string& path, int w, int h, const std::vector<uint8_t>& rgb);

}  // namespace mv::report
