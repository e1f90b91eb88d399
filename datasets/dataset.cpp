#include "datasets/dataset.h"

#include <algorithm>

#include "engine/error.h"

namespace mv::datasets {

void Dataset::validate() const {
  MV_CHECK(n >= 0 && channels > 0 && height > 0 && width > 0, "dataset '", name,
           "': bad dimensions n=", n, " C=", channels, " H=", height, " W=", width);
  MV_CHECK(num_classes > 0, "dataset '", name, "': num_classes is ", num_classes);
  MV_CHECK(int64_t(pixels.size()) == n * image_size(), "dataset '", name, "': ", pixels.size(),
           " pixel bytes, expected n*C*H*W = ", n * image_size());
  MV_CHECK(int64_t(labels.size()) == n, "dataset '", name, "': ", labels.size(),
           " labels for ", n, " images");
  for (int64_t i = 0; i < n; ++i)
    MV_CHECK(labels[size_t(i)] >= 0 && labels[size_t(i)] < num_classes, "dataset '", name,
             "': label ", labels[size_t(i)], " of image ", i, " is outside [0, ", num_classes, ")");
  MV_CHECK(class_names.empty() || int(class_names.size()) == num_classes, "dataset '", name,
           "': ", class_names.size(), " class names for ", num_classes, " classes");
}

Dataset head(const Dataset& d, int64_t count) {
  MV_CHECK(count >= 0, "head: negative count ", count);
  return rows(d, 0, std::min(count, d.n));
}

Dataset rows(const Dataset& d, int64_t begin, int64_t end) {
  MV_CHECK(0 <= begin && begin <= end && end <= d.n, "rows: [", begin, ", ", end, ") is not a "
           "range of the ", d.n, " images of ", d.name);
  Dataset r;
  r.name = d.name;
  r.n = end - begin;
  r.channels = d.channels, r.height = d.height, r.width = d.width;
  r.num_classes = d.num_classes;
  r.pixels.assign(d.image(begin), d.image(end));
  r.labels.assign(d.labels.begin() + begin, d.labels.begin() + end);
  r.class_names = d.class_names;
  return r;
}

}  // namespace mv::datasets
