// The routing statistics of an epoch's training steps, per MoE layer: for metrics.jsonl (key
// "moe") and one log line per layer.
#pragma once
#include <cstdio>
#include <nlohmann/json.hpp>

#include "models/vit.h"

namespace mv::train {

// Per MoE layer, the routing of the epoch's training steps: the share of filled buffer slots
// each expert had, the fraction of dropped choices, and the mean unweighted auxiliary losses.
// An empty array for a dense model. Under mpirun, of every rank's steps: every rank calls it.
nlohmann::ordered_json moe_stats_json(const models::ViT& model);

// One line per MoE layer: dropped choices and the least and most loaded expert (1 = even).
void print_moe_stats(FILE* log, const nlohmann::ordered_json& moe);

}  // namespace mv::train
