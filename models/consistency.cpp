#include "models/consistency.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "autograd/autograd.h"
#include "datasets/loader.h"
#include "engine/png.h"
#include "engine/random.h"
#include "train/data.h"
#include "ops/elementwise.h"
#include "ops/reduce.h"
#include "ops/shape.h"
#include "ops/topk.h"

// stb_easy_font (Debian's libstb-dev, header-only, all static): a tiny vector font for the plot.
// PNG encoding goes through engine/png.h, the project's one stb_image_write.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include <stb/stb_easy_font.h>
#pragma GCC diagnostic pop

namespace mv::models {

// ---- metrics ----------------------------------------------------------------------------------

void AgreementSums::add(const AgreementSums& o) {
  top1 += o.top1, top2 += o.top2, top2_set += o.top2_set, tokens += o.tokens;
  jaccard += o.jaccard;
}

Agreement AgreementSums::agreement() const {
  const double n = double(std::max<int64_t>(tokens, 1));
  return {double(top1) / n, double(top2) / n, double(top2_set) / n, jaccard / n};
}

AgreementSums compare_routes(const int32_t* a, const int32_t* b, int64_t tokens, int L,
                             int jaccard_k) {
  MV_CHECK(L >= 1 && jaccard_k >= 1 && jaccard_k <= L, "compare_routes: list length ", L,
           " and Jaccard k ", jaccard_k, ": expected 1 <= k <= length");
  AgreementSums s;
  s.tokens = tokens;
  for (int64_t t = 0; t < tokens; ++t) {
    const int32_t* x = a + t * L;
    const int32_t* y = b + t * L;
    const bool first = x[0] == y[0];
    s.top1 += first;
    if (L >= 2) {
      s.top2 += first && x[1] == y[1];
      s.top2_set += (first && x[1] == y[1]) || (x[0] == y[1] && x[1] == y[0]);
    } else {  // a single expert per token: its pair is itself
      s.top2 += first, s.top2_set += first;
    }
    // Top-k masks m, m': <m, m'> = |A n B|, |A u B| = 2k - <m, m'>.
    int inter = 0;
    for (int i = 0; i < jaccard_k; ++i)
      for (int j = 0; j < jaccard_k; ++j) inter += x[i] == y[j];
    s.jaccard += double(inter) / double(2 * jaccard_k - inter);
  }
  return s;
}

std::vector<int32_t> ranked_experts(const Tensor& probs, int L) {
  const Tensor p = probs.to(Device::CPU).contiguous();
  MV_CHECK(p.ndim() >= 1 && p.dtype() == DType::F32, "ranked_experts: probs ", p.str(),
           " must be F32 (..., E)");
  const int64_t E = p.size(-1), n = p.numel() / std::max<int64_t>(E, 1);
  MV_CHECK(L >= 1 && L <= E, "ranked_experts: ", L, " experts per token asked of ", p.str());
  // ops::topk sorts descending with ties to the lower index, the order the metrics need.
  const std::vector<int64_t> idx = ops::topk(p.detach(), L).indices.to_vector<int64_t>();
  std::vector<int32_t> out(size_t(n * L));
  std::transform(idx.begin(), idx.end(), out.begin(), [](int64_t e) { return int32_t(e); });
  return out;
}

int parse_noise_on(const std::string& s) {
  if (s == "pixels") return -1;
  const std::string pre = "block:";
  if (s.rfind(pre, 0) == 0 && s.size() > pre.size() &&
      s.find_first_not_of("0123456789", pre.size()) == std::string::npos)
    return std::stoi(s.substr(pre.size()));
  MV_FAIL("--noise-on: '", s, "' must be pixels or block:N (N a block index)");
}

// ---- the sweep --------------------------------------------------------------------------------

// The model's forward with eps added to the token input of block `block` (pixels when < 0).
static Tensor forward_with_noise(ViT& m, const Tensor& images, int block, const Tensor& eps) {
  if (block < 0) return m.forward(images + eps);
  m.block_input_hook = [&](int i, const Tensor& x) { return i == block ? x + eps : x; };
  Tensor logits;
  try {
    logits = m.forward(images);
  } catch (...) {
    m.block_input_hook = nullptr;
    throw;
  }
  m.block_input_hook = nullptr;
  return logits;
}

static std::vector<int64_t> predictions(const Tensor& logits) {
  return ops::argmax(logits, 1).to_vector<int64_t>();
}

ConsistencyResult routing_consistency(ViT& model, const datasets::Dataset& data,
                                      const ConsistencyConfig& cfg) {
  const ViTConfig& vc = model.config;
  const std::vector<MoELayer*> layers = model.moe_layers();
  MV_CHECK(!layers.empty(), "routing consistency: the model (MoE placement '", vc.moe_placement,
           "') has no MoE layers: there is no routing to compare");
  MV_CHECK(cfg.block >= -1 && cfg.block < vc.depth, "routing consistency: noise on block ",
           cfg.block, ", but the model has blocks 0..", vc.depth - 1);
  MV_CHECK(!cfg.sigmas.empty(), "routing consistency: no sigma to sweep");
  for (double s : cfg.sigmas)
    MV_CHECK(std::isfinite(s) && s >= 0, "routing consistency: sigma ", s, " must be >= 0");
  MV_CHECK(cfg.batch >= 1, "routing consistency: batch ", cfg.batch, " must be >= 1");
  MV_CHECK(!cfg.dataset.empty(), "routing consistency: the data set name (for its normalisation) "
           "is not set");
  MV_CHECK(data.n > 0, "routing consistency: data set '", data.name, "' is empty");
  MV_CHECK(data.channels == vc.channels && data.height == vc.image_size &&
               data.width == vc.image_size,
           "routing consistency: images of '", data.name, "' are (", data.channels, ", ",
           data.height, ", ", data.width, "), the model expects (", vc.channels, ", ",
           vc.image_size, ", ", vc.image_size, ")");

  const RouterConfig& rc = vc.moe.router;
  const int E = rc.experts;
  const int jk = std::min(rc.token_choice() ? rc.k : 2, E);
  const int L = std::max(jk, std::min(2, E));  // experts ranked per token

  ConsistencyResult res;
  res.noise_on = cfg.block < 0 ? "pixels" : "block:" + std::to_string(cfg.block);
  for (int i = 0; i < vc.depth; ++i)
    if (vc.is_moe_block(i)) res.moe_blocks.push_back(i);
  res.router = rc.type;
  res.jaccard_k = jk;
  res.seed = cfg.seed;

  const size_t S = cfg.sigmas.size(), NL = layers.size();
  std::vector<std::vector<AgreementSums>> sums(S, std::vector<AgreementSums>(NL));
  std::vector<int64_t> correct(S, 0);
  int64_t clean_correct = 0;
  // One stream per sigma, all from the same seed: every sigma scales the same draws.
  std::vector<Generator> gens(S, Generator(cfg.seed));

  const bool was_training = model.training();
  model.train(false);
  autograd::NoGrad no_grad;
  const Device dev = model.device();
  datasets::Loader loader(data, cfg.batch, /*shuffle=*/false, 0, /*drop_last=*/false,
                          datasets::Augment::none(), train::normalization(cfg.dataset));
  try {
    loader.begin_epoch(0);
    for (datasets::Batch b; loader.next(b);) {
      const Tensor images = b.images.to(dev);
      const std::vector<int64_t> labels = b.labels.to_vector<int64_t>();
      const int64_t B = images.size(0);
      std::vector<int64_t> pred = predictions(model.forward(images));
      for (int64_t i = 0; i < B; ++i) clean_correct += pred[size_t(i)] == labels[size_t(i)];
      std::vector<std::vector<int32_t>> clean(NL);
      for (size_t l = 0; l < NL; ++l) clean[l] = ranked_experts(layers[l]->last.probs, L);
      const int64_t tokens = int64_t(clean[0].size()) / L;

      const Shape noise_shape = cfg.block < 0 ? images.shape()
                                              : Shape{B, int64_t(vc.tokens()), int64_t(vc.dim)};
      for (size_t s = 0; s < S; ++s) {
        const Tensor eps = ops::mul(randn(noise_shape, gens[s]), float(cfg.sigmas[s])).to(dev);
        const Tensor logits = forward_with_noise(model, images, cfg.block, eps);
        pred = predictions(logits);
        for (int64_t i = 0; i < B; ++i) correct[s] += pred[size_t(i)] == labels[size_t(i)];
        for (size_t l = 0; l < NL; ++l) {
          const std::vector<int32_t> r = ranked_experts(layers[l]->last.probs, L);
          sums[s][l].add(compare_routes(clean[l].data(), r.data(), tokens, L, jk));
        }
      }
      res.images += B;
    }
  } catch (...) {
    model.train(was_training);
    throw;
  }
  model.train(was_training);

  res.tokens = sums[0][0].tokens;
  res.clean_accuracy = double(clean_correct) / double(res.images);
  for (size_t s = 0; s < S; ++s) {
    SigmaPoint p;
    p.sigma = cfg.sigmas[s];
    p.accuracy = double(correct[s]) / double(res.images);
    for (size_t l = 0; l < NL; ++l) {
      const Agreement a = sums[s][l].agreement();
      p.layers.push_back(a);
      p.mean.top1 += a.top1 / double(NL), p.mean.top2 += a.top2 / double(NL);
      p.mean.top2_set += a.top2_set / double(NL), p.mean.jaccard += a.jaccard / double(NL);
    }
    res.points.push_back(p);
  }
  return res;
}

// ---- writers ----------------------------------------------------------------------------------

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

namespace {

// An RGB canvas with the few primitives the plot needs.
struct Canvas {
  int w, h;
  std::vector<uint8_t> px;
  Canvas(int w_, int h_) : w(w_), h(h_), px(size_t(w_) * h_ * 3, 255) {}
  void fill(int x0, int y0, int x1, int y1, const uint8_t* c) {  // [x0, x1) x [y0, y1)
    for (int y = std::max(y0, 0); y < std::min(y1, h); ++y)
      for (int x = std::max(x0, 0); x < std::min(x1, w); ++x)
        std::copy(c, c + 3, &px[(size_t(y) * w + x) * 3]);
  }
  // A line 2 px thick; dashed: 6 px on, 6 px off.
  void line(float x0, float y0, float x1, float y1, const uint8_t* c, bool dashed = false) {
    const int n = int(std::ceil(std::max(std::fabs(x1 - x0), std::fabs(y1 - y0)))) + 1;
    for (int i = 0; i <= n; ++i) {
      if (dashed && (i / 6) % 2) continue;
      const float t = float(i) / float(n);
      const int x = int(std::lround(x0 + t * (x1 - x0))), y = int(std::lround(y0 + t * (y1 - y0)));
      fill(x - 1, y - 1, x + 1, y + 1, c);
    }
  }
  // Text from stb_easy_font's quads (axis-aligned rectangles), scaled; (x, y) is the top left.
  void text(float x, float y, const std::string& s, const uint8_t* c, float scale = 1.f) {
    std::vector<float> vbuf(16 * 1024);  // 4 vertices of 4 words (x, y, z, colour) per quad
    std::vector<char> str(s.begin(), s.end());
    str.push_back('\0');
    const int quads = stb_easy_font_print(0, 0, str.data(), nullptr, vbuf.data(),
                                          int(vbuf.size() * sizeof(float)));
    for (int q = 0; q < quads; ++q) {
      const float* v0 = &vbuf[size_t(q) * 16];      // top left
      const float* v2 = &vbuf[size_t(q) * 16 + 8];  // bottom right
      fill(int(x + v0[0] * scale), int(y + v0[1] * scale), int(x + v2[0] * scale),
           int(y + v2[1] * scale), c);
    }
  }
  static int text_width(const std::string& s, float scale = 1.f) {
    std::vector<char> str(s.begin(), s.end());
    str.push_back('\0');
    return int(float(stb_easy_font_width(str.data())) * scale);
  }
};

}  // namespace

void write_consistency_png(const ConsistencyResult& r, const std::string& path, int width,
                           int height) {
  MV_CHECK(width >= 320 && height >= 200, "consistency plot: ", width, " x ", height,
           " is too small (at least 320 x 200)");
  MV_CHECK(!r.points.empty(), "consistency plot: no sweep points");
  static const uint8_t black[3] = {0, 0, 0}, grid[3] = {225, 225, 225};
  static const uint8_t colors[5][3] = {
      {31, 90, 200}, {215, 40, 40}, {30, 160, 60}, {240, 140, 0}, {120, 120, 120}};
  static const char* names[5] = {"top-1", "top-2", "top-2 set", "Jaccard", "accuracy"};
  const float scale = 1.5f;
  Canvas cv(width, height);
  const int left = 60, right = width - 130, top = 30, bottom = height - 50;
  auto X = [&](size_t i) {
    return r.points.size() == 1 ? 0.5f * float(left + right)
                                : float(left) + float(right - left) * float(i) /
                                                    float(r.points.size() - 1);
  };
  auto Y = [&](double v) { return float(bottom) - float(bottom - top) * float(v); };

  // Grid and y ticks every 0.25, axes, x ticks at the sweep points.
  char label[64];
  for (int t = 0; t <= 4; ++t) {
    const int y = int(Y(0.25 * t));
    if (t > 0) cv.fill(left, y, right, y + 1, grid);
    std::snprintf(label, sizeof label, "%.2f", 0.25 * t);
    cv.text(float(left - 8 - Canvas::text_width(label, scale)), float(y) - 5, label, black, scale);
  }
  cv.fill(left, top, left + 1, bottom + 1, black);
  cv.fill(left, bottom, right, bottom + 1, black);
  for (size_t i = 0; i < r.points.size(); ++i) {
    const int x = int(X(i));
    cv.fill(x, bottom, x + 1, bottom + 5, black);
    std::snprintf(label, sizeof label, "%g", r.points[i].sigma);
    cv.text(float(x - Canvas::text_width(label, scale) / 2), float(bottom + 8), label, black, scale);
  }
  const std::string xlabel = "sigma (noise on " + r.noise_on + ")";
  cv.text(0.5f * float(left + right - Canvas::text_width(xlabel, scale)), float(bottom + 28),
          xlabel, black, scale);
  cv.text(float(left), 8, "routing agreement (mean over MoE layers)", black, scale);

  // Curves with square markers, top-1 last so that it stays visible where curves coincide
  // (Jaccard equals top-1 when k = 1).
  for (int m = 4; m >= 0; --m) {
    auto value = [&](const SigmaPoint& p) {
      return m == 0 ? p.mean.top1 : m == 1 ? p.mean.top2 : m == 2 ? p.mean.top2_set
                   : m == 3 ? p.mean.jaccard : p.accuracy;
    };
    for (size_t i = 0; i < r.points.size(); ++i) {
      const float x = X(i), y = Y(value(r.points[i]));
      if (i > 0) cv.line(X(i - 1), Y(value(r.points[i - 1])), x, y, colors[m], m == 4);
      cv.fill(int(x) - 3, int(y) - 3, int(x) + 4, int(y) + 4, colors[m]);
    }
  }
  // Legend: a swatch and a name per curve.
  for (int m = 0; m < 5; ++m) {
    const int y = top + 10 + 22 * m;
    cv.fill(right + 15, y, right + 35, y + 12, colors[m]);
    cv.text(float(right + 42), float(y), names[m], black, scale);
  }

  write_png(path, width, height, cv.px);
}

static void write_text(const std::string& path, const std::string& s) {
  std::ofstream f(path, std::ios::binary);
  f << s;
  f.close();
  MV_CHECK(f.good(), "routing consistency: cannot write '", path, "'");
}

void write_consistency_report(const ConsistencyResult& r, const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  MV_CHECK(!ec, "routing consistency: cannot create folder '", dir, "': ", ec.message());
  const std::filesystem::path d(dir);
  write_text((d / "consistency.json").string(), consistency_json(r));
  write_text((d / "consistency.csv").string(), consistency_csv(r));
  write_consistency_png(r, (d / "consistency.png").string());
}

}  // namespace mv::models
