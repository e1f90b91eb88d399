#include "report/chart.h"

#include <cmath>
#include <cstdio>

#include "engine/error.h"

namespace mv::report {

void draw_chart(RgbImage& img, int x0, int y0, int x1, int y1, const Chart& c) {
  static constexpr Rgb grid{225, 225, 225};
  const float scale = 1.5f;
  const int left = x0 + 60, right = x1 - 130, top = y0 + 30;
  const int bottom = y1 - (c.x_ticks2.empty() ? 50 : 68);
  MV_CHECK(right - left >= 40 && bottom - top >= 40, "chart '", c.title, "': ", x1 - x0, " x ",
           y1 - y0, " pixels is too small");
  MV_CHECK(c.y_max > c.y_min && c.y_divisions >= 1, "chart '", c.title, "': y range [", c.y_min,
           ", ", c.y_max, "] is empty");
  const size_t n = c.x_ticks.size();
  auto X = [&](size_t i) {
    return n <= 1 ? 0.5f * float(left + right)
                  : float(left) + float(right - left) * float(i) / float(n - 1);
  };
  auto Y = [&](double v) {
    return float(bottom) - float(bottom - top) * float((v - c.y_min) / (c.y_max - c.y_min));
  };

  char label[64];
  for (int t = 0; t <= c.y_divisions; ++t) {
    const double v = c.y_min + (c.y_max - c.y_min) * t / c.y_divisions;
    const int y = int(Y(v));
    if (t > 0) fill_rect(img, left, y, right, y + 1, grid);
    std::snprintf(label, sizeof label, c.y_format, v);
    draw_text(img, float(left - 8 - text_width(label, scale)), float(y) - 5, label, kBlack, scale);
  }
  fill_rect(img, left, top, left + 1, bottom + 1, kBlack);
  fill_rect(img, left, bottom, right, bottom + 1, kBlack);
  // Every x label when they fit, else evenly spaced ones.
  const size_t step = std::max<size_t>(1, (n * 40 + size_t(right - left) - 1) / size_t(right - left));
  for (size_t i = 0; i < n; i += step) {
    const int x = int(X(i));
    fill_rect(img, x, bottom, x + 1, bottom + 5, kBlack);
    draw_text(img, float(x - text_width(c.x_ticks[i], scale) / 2), float(bottom + 8), c.x_ticks[i],
              kBlack, scale);
    if (i < c.x_ticks2.size())
      draw_text(img, float(x - text_width(c.x_ticks2[i], scale) / 2), float(bottom + 26),
                c.x_ticks2[i], kBlack, scale);
  }
  draw_text(img, 0.5f * float(left + right - text_width(c.x_label, scale)),
            float(y1 - 22), c.x_label, kBlack, scale);
  draw_text(img, float(left), float(y0 + 8), c.title, kBlack, scale);

  for (size_t s = c.series.size(); s-- > 0;) {
    const Series& se = c.series[s];
    for (size_t i = 0; i < se.y.size() && i < n; ++i) {
      if (!std::isfinite(se.y[i])) continue;
      const float x = X(i), y = Y(se.y[i]);
      if (i > 0 && std::isfinite(se.y[i - 1]))
        draw_line(img, X(i - 1), Y(se.y[i - 1]), x, y, se.colour, se.dashed);
      fill_rect(img, int(x) - 3, int(y) - 3, int(x) + 4, int(y) + 4, se.colour);
    }
  }
  for (size_t s = 0; s < c.series.size(); ++s) {
    const int y = top + 10 + 22 * int(s);
    fill_rect(img, right + 15, y, right + 35, y + 12, c.series[s].colour);
    draw_text(img, float(right + 42), float(y), c.series[s].name, kBlack, scale);
  }
}

}  // namespace mv::report
