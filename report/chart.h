// Line charts for the reports: one panel with a title, horizontal grid lines, y ticks, x ticks
// (one or two rows of labels, e.g. epoch and time) and a legend; each series a polyline with
// square markers. The routing-consistency plot and the training curves are drawn with it.
#pragma once
#include <string>
#include <vector>

#include "report/draw.h"

namespace mv::report {

struct Series {
  std::string name;
  Rgb colour;
  std::vector<double> y;  // one value per x position; NaN leaves a gap
  bool dashed = false;
};

struct Chart {
  std::string title, x_label;
  std::vector<std::string> x_ticks, x_ticks2;  // labels of the x positions; x_ticks2 a second row
  double y_min = 0, y_max = 1;
  int y_divisions = 4;          // grid lines and labels at y_min + i (y_max - y_min) / divisions
  const char* y_format = "%.2f";
  std::vector<Series> series;   // drawn last to first, so the first stays on top
};

// Draws c into the rectangle (x0, y0)-(x1, y1) of img: the plot area, with room kept for the
// labels on the left and below and for the legend on the right.
void draw_chart(RgbImage& img, int x0, int y0, int x1, int y1, const Chart& c);

}  // namespace mv::report
