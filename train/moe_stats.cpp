#include "train/moe_stats.h"

#include <algorithm>
#include <string>
#include <vector>

#include "dist/comm.h"

namespace mv::train {

nlohmann::ordered_json moe_stats_json(const models::ViT& model) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (size_t b = 0; b < model.blocks.size(); ++b) {
    const models::MoELayer* m = model.blocks[b]->moe.get();
    if (!m) continue;
    const models::MoEStats::Totals s = m->stats.totals();
    // Over every rank's share of the batches (a world of one: this process's): the loads,
    // choices and drops summed, the losses averaged.
    std::vector<double> v(s.load.begin(), s.load.end());
    v.insert(v.end(), {double(s.choices), double(s.dropped), s.importance_loss, s.load_loss,
                       s.separation_loss});
    v = dist::sum(v);
    const size_t E = s.load.size();
    const double ranks = dist::size();
    double filled = 0;
    for (size_t e = 0; e < E; ++e) filled += v[e];
    std::vector<double> share;
    for (size_t e = 0; e < E; ++e) share.push_back(filled > 0 ? v[e] / filled : 0.0);
    out.push_back({{"block", b}, {"router", m->config.router.type}, {"load", share},
                   {"dropped", v[E] > 0 ? v[E + 1] / v[E] : 0.0},
                   {"importance_loss", v[E + 2] / ranks}, {"load_loss", v[E + 3] / ranks},
                   {"separation_loss", v[E + 4] / ranks}});
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
