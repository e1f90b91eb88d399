// libFuzzer target for a checkpoint's config.json: TrainConfig::from_json, then validate(), as
// --resume, eval and viz read it (train/config.h). A configuration that passes must come back
// unchanged from its own JSON.
#include <cstdlib>
#include <string>

#include "engine/error.h"
#include "train/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using mv::train::TrainConfig;
  try {
    const TrainConfig c =
        TrainConfig::from_json(std::string(reinterpret_cast<const char*>(data), size));
    c.validate();
    const std::string json = c.to_json();
    if (TrainConfig::from_json(json).to_json() != json) std::abort();
  } catch (const mv::Error&) {
  }
  return 0;
}
