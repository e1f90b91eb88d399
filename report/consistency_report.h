// The report of a routing-consistency sweep (report/consistency.h): JSON, CSV, a text table and
// a PNG plot.
#pragma once
#include <string>

#include "report/consistency.h"

namespace mv::report {

std::string consistency_json(const ConsistencyResult& r);
// One row per (sigma, layer) plus a "mean" row per sigma:
// sigma,layer,block,top1,top2,top2_set,jaccard,accuracy
std::string consistency_csv(const ConsistencyResult& r);
// A fixed-width table, one row per sigma (mean over layers), then per-layer top-1.
std::string consistency_table(const ConsistencyResult& r);
// Agreement (mean over layers) against sigma, sweep points evenly spaced on x in the given order,
// y from 0 to 1: top-1 blue, top-2 red, top-2 set green, Jaccard orange, accuracy grey (dashed);
// a small legend and axis labels. Throws when the file cannot be written.
void write_consistency_png(const ConsistencyResult& r, const std::string& path, int width = 640,
                           int height = 400);
// consistency.json, consistency.csv and consistency.png in dir (created if missing).
void write_consistency_report(const ConsistencyResult& r, const std::string& dir);

}  // namespace mv::report
