// safetensors files (https://github.com/huggingface/safetensors, format only): an 8-byte
// little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__":
// {string: string}}, then the raw little-endian tensor bytes.
#pragma once
#include <map>
#include <string>

#include "engine/tensor.h"

namespace mv {

using TensorMap = std::map<std::string, Tensor>;
using Metadata = std::map<std::string, std::string>;

// Writes atomically: a temporary file in the same folder, flushed, then renamed over `path`, so a
// crash leaves either the old file or the new one. Tensors may live on any device.
void save_safetensors(const std::string& path, const TensorMap& tensors, const Metadata& meta = {});

// Reads and validates the whole file: header length and JSON, known dtypes, shapes, offsets
// inside the data and matching each shape, no overlaps. Errors name the file and the entry.
TensorMap load_safetensors(const std::string& path, Metadata* meta = nullptr);

}  // namespace mv
