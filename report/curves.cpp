#include "report/curves.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/error.h"
#include "report/chart.h"
#include "train/progress.h"

namespace mv::report {

bool write_training_curves(const std::string& metrics_path, const std::string& png_path) {
  std::ifstream in(metrics_path);
  MV_CHECK(in, "training curves: cannot read '", metrics_path, "'");
  Chart loss, acc;
  loss.series = {{"test", {215, 40, 40}, {}}, {"train", {31, 90, 200}, {}, true}};
  acc.series = loss.series;
  double seconds = 0;
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
      seconds += j.value("epoch_seconds", 0.0);
      if (!j.contains("test_accuracy")) continue;  // a partial epoch: no evaluation
      loss.series[0].y.push_back(j.at("test_loss").get<double>());
      loss.series[1].y.push_back(j.at("train_loss").get<double>());
      acc.series[0].y.push_back(100 * j.at("test_accuracy").get<double>());
      acc.series[1].y.push_back(100 * j.at("train_accuracy").get<double>());
      loss.x_ticks.push_back(std::to_string(j.at("epoch").get<int>()));
    } catch (const nlohmann::json::exception& e) {
      MV_FAIL("training curves: '", metrics_path, "' line ", line_no, ": ", e.what());
    }
    loss.x_ticks2.push_back(train::format_seconds(seconds));
  }
  if (loss.x_ticks.empty()) return false;
  acc.x_ticks = loss.x_ticks, acc.x_ticks2 = loss.x_ticks2;

  // Losses from 0; accuracies from the lowest one seen, in steps of 10 points.
  double max_loss = 0, min_acc = 100;
  for (const Series& s : loss.series)
    for (double v : s.y) max_loss = std::max(max_loss, std::isfinite(v) ? v : 0.0);
  for (const Series& s : acc.series)
    for (double v : s.y) min_acc = std::min(min_acc, std::isfinite(v) ? v : 100.0);
  loss.y_max = max_loss > 0 ? 1.1 * max_loss : 1;
  loss.y_format = "%.2f";
  acc.y_min = std::min(90.0, 10 * std::floor(min_acc / 10));
  acc.y_max = 100;
  acc.y_divisions = int(std::lround((acc.y_max - acc.y_min) / 10)) * (acc.y_min >= 80 ? 2 : 1);
  acc.y_format = "%.0f";
  loss.title = "loss (cross-entropy)", acc.title = "accuracy (%)";
  loss.x_label = acc.x_label = "epoch / training time";

  const int w = 720, h = 360;
  RgbImage img(w, 2 * h);
  draw_chart(img, 0, 0, w, h, loss);
  draw_chart(img, 0, h, w, 2 * h, acc);
  write_png(png_path, img.width, img.height, img.rgb);
  return true;
}

}  // namespace mv::report
