#include "train/moe_stats.h"

#include <algorithm>
#include <string>
#include <vector>

namespace mv::train {

nlohmann::ordered_json moe_stats_json(const models::ViT& model) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (size_t b = 0; b < model.blocks.size(); ++b) {
    const models::MoELayer* m = model.blocks[b]->moe.get();
    if (!m) continue;
    const models::MoEStats::Totals s = m->stats.totals();
    int64_t filled = 0;
    for (int64_t l : s.load) filled += l;
    std::vector<double> share;
    for (int64_t l : s.load) share.push_back(filled ? double(l) / double(filled) : 0.0);
    out.push_back({{"block", b}, {"router", m->config.router.type}, {"load", share},
                   {"dropped", s.choices ? double(s.dropped) / double(s.choices) : 0.0},
                   {"importance_loss", s.importance_loss}, {"load_loss", s.load_loss},
                   {"separation_loss", s.separation_loss}});
  }
  return out;
}

void print_moe_stats(FILE* log, const nlohmann::ordered_json& moe) {
  for (auto& l : moe) {
    const std::vector<double> share = l.at("load");
    const auto [lo, hi] = std::minmax_element(share.begin(), share.end());
    const double even = 1.0 / double(share.size());
    std::fprintf(log, "  block %d (%s): dropped %.2f%%, expert load %.2f..%.2f of even, "
                 "importance loss %.4f, load loss %.4f\n",
                 int(l.at("block")), std::string(l.at("router")).c_str(),
                 100 * double(l.at("dropped")), *lo / even, *hi / even,
                 double(l.at("importance_loss")), double(l.at("load_loss")));
  }
}

}  // namespace mv::train
