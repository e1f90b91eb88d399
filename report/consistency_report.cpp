#include "report/consistency_report.h"

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "engine/file_write.h"
#include "report/chart.h"

namespace mv::report {

static nlohmann::ordered_json agreement_json(const Agreement& a) {
  return {{"top1", a.top1}, {"top2", a.top2}, {"top2_set", a.top2_set}, {"jaccard", a.jaccard}};
}

std::string consistency_json(const ConsistencyResult& r) {
  nlohmann::ordered_json j;
  j["noise_on"] = r.noise_on;
  j["seed"] = r.seed;
  j["router"] = r.router;
  j["jaccard_k"] = r.jaccard_k;
  j["moe_blocks"] = r.moe_blocks;
  j["images"] = r.images;
  j["tokens_per_layer"] = r.tokens;
  j["clean_accuracy"] = r.clean_accuracy;
  j["points"] = nlohmann::ordered_json::array();
  for (const SigmaPoint& p : r.points) {
    nlohmann::ordered_json q;
    q["sigma"] = p.sigma;
    q["accuracy"] = p.accuracy;
    q["mean"] = agreement_json(p.mean);
    q["layers"] = nlohmann::ordered_json::array();
    for (size_t l = 0; l < p.layers.size(); ++l) {
      nlohmann::ordered_json a = agreement_json(p.layers[l]);
      a["block"] = l < r.moe_blocks.size() ? r.moe_blocks[l] : -1;
      q["layers"].push_back(a);
    }
    j["points"].push_back(q);
  }
  // What the PNG shows, so that it can be read without its legend.
  j["plot"] = {{"x", "sweep points evenly spaced, in order"}, {"y_min", 0}, {"y_max", 1},
               {"colors", {{"top1", "blue"}, {"top2", "red"}, {"top2_set", "green"},
                           {"jaccard", "orange"}, {"accuracy", "grey dashed"}}}};
  return j.dump(2) + "\n";
}

std::string consistency_csv(const ConsistencyResult& r) {
  std::string out = "sigma,layer,block,top1,top2,top2_set,jaccard,accuracy\n";
  char line[256];
  auto row = [&](double sigma, const std::string& layer, int block, const Agreement& a,
                 double acc) {
    std::snprintf(line, sizeof line, "%g,%s,%d,%.6f,%.6f,%.6f,%.6f,%.6f\n", sigma,
                  layer.c_str(), block, a.top1, a.top2, a.top2_set, a.jaccard, acc);
    out += line;
  };
  for (const SigmaPoint& p : r.points) {
    for (size_t l = 0; l < p.layers.size(); ++l)
      row(p.sigma, std::to_string(l), l < r.moe_blocks.size() ? r.moe_blocks[l] : -1,
          p.layers[l], p.accuracy);
    row(p.sigma, "mean", -1, p.mean, p.accuracy);
  }
  return out;
}

std::string consistency_table(const ConsistencyResult& r) {
  std::string out;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "routing consistency: noise on %s, seed %llu, router %s, %lld images, %lld tokens "
                "per layer, Jaccard of top-%d sets\nclean accuracy %.2f%%\n",
                r.noise_on.c_str(), (unsigned long long)r.seed, r.router.c_str(),
                (long long)r.images, (long long)r.tokens, r.jaccard_k, 100 * r.clean_accuracy);
  out += buf;
  out += "   sigma    top-1    top-2  top-2 set  Jaccard  accuracy   top-1 per layer (block:";
  for (int b : r.moe_blocks) out.append(1, ' ').append(std::to_string(b));
  out += ")\n";
  for (const SigmaPoint& p : r.points) {
    std::snprintf(buf, sizeof buf, "%8g  %6.2f%%  %6.2f%%   %6.2f%%  %6.2f%%   %6.2f%%  ",
                  p.sigma, 100 * p.mean.top1, 100 * p.mean.top2, 100 * p.mean.top2_set,
                  100 * p.mean.jaccard, 100 * p.accuracy);
    out += buf;
    for (const Agreement& a : p.layers) {
      std::snprintf(buf, sizeof buf, " %6.2f%%", 100 * a.top1);
      out += buf;
    }
    out += "\n";
  }
  return out;
}

void write_consistency_png(const ConsistencyResult& r, const std::string& path, int width,
                           int height) {
  MV_CHECK(width >= 320 && height >= 200, "consistency plot: ", width, " x ", height,
           " is too small (at least 320 x 200)");
  MV_CHECK(!r.points.empty(), "consistency plot: no sweep points");
  Chart c;
  c.title = "routing agreement (mean over MoE layers)";
  c.x_label = "sigma (noise on " + r.noise_on + ")";
  char label[32];
  for (const SigmaPoint& p : r.points) {
    std::snprintf(label, sizeof label, "%g", p.sigma);
    c.x_ticks.push_back(label);
  }
  // Top-1 first, so that it stays visible where curves coincide (Jaccard equals top-1 for k = 1).
  c.series = {{"top-1", {31, 90, 200}, {}}, {"top-2", {215, 40, 40}, {}},
              {"top-2 set", {30, 160, 60}, {}}, {"Jaccard", {240, 140, 0}, {}},
              {"accuracy", {120, 120, 120}, {}, true}};
  for (const SigmaPoint& p : r.points) {
    const double values[5] = {p.mean.top1, p.mean.top2, p.mean.top2_set, p.mean.jaccard, p.accuracy};
    for (size_t m = 0; m < 5; ++m) c.series[m].y.push_back(values[m]);
  }
  RgbImage img(width, height);
  draw_chart(img, 0, 0, width, height, c);
  write_png(path, img.width, img.height, img.rgb);
}

void write_consistency_report(const ConsistencyResult& r, const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  MV_CHECK(!ec, "routing consistency: cannot create folder '", dir, "': ", ec.message());
  const std::filesystem::path d(dir);
  write_file((d / "consistency.json").string(), consistency_json(r));
  write_file((d / "consistency.csv").string(), consistency_csv(r));
  write_consistency_png(r, (d / "consistency.png").string());
}

}  // namespace mv::report
