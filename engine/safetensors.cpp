#include "engine/safetensors.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "engine/file_write.h"

namespace mv {
namespace {

constexpr uint64_t kMaxHeader = 100u << 20;  // as the reference implementation bounds it

DType parse_dtype(const std::string& s, const std::string& where) {
  for (DType t : {DType::F32, DType::I32, DType::I64, DType::BF16, DType::F16})
    if (s == dtype_name(t)) return t;
  MV_FAIL(where, ": unsupported dtype '", s, "' (expected F32, I32, I64, BF16 or F16)");
}

}  // namespace

void save_safetensors(const std::string& path, const TensorMap& tensors, const Metadata& meta) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!meta.empty()) header["__metadata__"] = meta;
  uint64_t off = 0;
  for (const auto& [name, t] : tensors) {
    MV_CHECK(name != "__metadata__", "save_safetensors ", path, ": '__metadata__' is reserved");
    header[name] = {{"dtype", dtype_name(t.dtype())},
                    {"shape", t.shape()},
                    {"data_offsets", {off, off + t.nbytes()}}};
    off += t.nbytes();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keeps the data 8-byte aligned
  const uint64_t hlen = h.size();

  FileWriter w(path);
  w.write(&hlen, 8);
  w.write(h.data(), h.size());
  for (const auto& [name, t] : tensors) {
    std::vector<char> bytes(t.nbytes());
    copy_bytes(bytes.data(), Device::CPU, t.contiguous().raw(), t.device(), bytes.size());
    w.write(bytes.data(), bytes.size());
  }
  w.commit();
}

TensorMap load_safetensors(const std::string& path, Metadata* meta) {
  // On Linux a folder opens as a stream too, and would fail later as a bad header.
  MV_CHECK(!std::filesystem::is_directory(path), "load_safetensors: '", path,
           "' is a folder, not a safetensors file");
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  MV_CHECK(in, "load_safetensors: cannot open '", path, "'");
  const uint64_t fsize = uint64_t(in.tellg());
  in.seekg(0);
  MV_CHECK(fsize >= 8, "load_safetensors '", path, "': file has ", fsize,
           " bytes, fewer than the 8-byte header length");
  uint64_t hlen = 0;
  in.read(reinterpret_cast<char*>(&hlen), 8);
  MV_CHECK(hlen <= kMaxHeader && hlen <= fsize - 8, "load_safetensors '", path,
           "': header length ", hlen, " exceeds the file (", fsize, " bytes) or the 100 MiB limit");
  std::string h(hlen, '\0');
  in.read(h.data(), std::streamsize(hlen));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(h);
  } catch (const std::exception& e) {
    MV_FAIL("load_safetensors '", path, "': header is not valid JSON (", e.what(), ")");
  }
  MV_CHECK(header.is_object(), "load_safetensors '", path, "': header is not a JSON object");
  const uint64_t data_size = fsize - 8 - hlen;

  struct Entry { std::string name; DType dtype; Shape shape; uint64_t begin, end; };
  std::vector<Entry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string where = "load_safetensors '" + path + "' tensor '" + it.key() + "'";
    if (it.key() == "__metadata__") {
      MV_CHECK(it->is_object(), where, ": must be an object of strings");
      for (auto m = it->begin(); m != it->end(); ++m) {
        MV_CHECK(m->is_string(), where, ": value of '", m.key(), "' is not a string");
        if (meta) (*meta)[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const auto& e = *it;
    MV_CHECK(e.is_object() && e.contains("dtype") && e.contains("shape") &&
                 e.contains("data_offsets") && e["dtype"].is_string() && e["shape"].is_array() &&
                 e["data_offsets"].is_array() && e["data_offsets"].size() == 2,
             where, ": expected {dtype, shape, data_offsets: [begin, end]}");
    Entry en{it.key(), parse_dtype(e["dtype"].get<std::string>(), where), {}, 0, 0};
    // The element count is checked as it multiplies (zeros aside, which make the tensor empty):
    // sizes such as 2^32 x 2^32 would overflow it, and the strides, past 2^63.
    int64_t nonzero = 1;
    for (const auto& d : e["shape"]) {
      MV_CHECK(d.is_number_unsigned() && d.get<uint64_t>() <= uint64_t(INT64_MAX), where,
               ": shape entries must be integers in 0..2^63-1, got ", d.dump());
      en.shape.push_back(d.get<int64_t>());
      MV_CHECK(en.shape.back() == 0 || !__builtin_mul_overflow(nonzero, en.shape.back(), &nonzero),
               where, ": shape ", e["shape"].dump(), " has more than 2^63 elements");
    }
    MV_CHECK(e["data_offsets"][0].is_number_unsigned() && e["data_offsets"][1].is_number_unsigned(),
             where, ": data_offsets must be non-negative integers");
    en.begin = e["data_offsets"][0].get<uint64_t>();
    en.end = e["data_offsets"][1].get<uint64_t>();
    MV_CHECK(en.begin <= en.end && en.end <= data_size, where, ": data_offsets [", en.begin, ", ",
             en.end, "] fall outside the ", data_size, " data bytes");
    const uint64_t numel = uint64_t(shape_numel(en.shape)), dsize = dtype_size(en.dtype);
    MV_CHECK(numel <= UINT64_MAX / dsize, where, ": shape ", shape_str(en.shape), " of ",
             dtype_name(en.dtype), " needs more than 2^64 bytes");
    MV_CHECK(en.end - en.begin == numel * dsize, where, ": holds ", en.end - en.begin,
             " bytes but shape ", shape_str(en.shape), " of ", dtype_name(en.dtype), " needs ",
             numel * dsize);
    entries.push_back(std::move(en));
  }
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const Entry* a, const Entry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    MV_CHECK(by_offset[i]->begin >= by_offset[i - 1]->end, "load_safetensors '", path,
             "': tensors '", by_offset[i - 1]->name, "' and '", by_offset[i]->name, "' overlap");

  TensorMap out;
  for (const auto& e : entries) {
    Tensor t = Tensor::empty(e.shape, e.dtype);
    in.seekg(std::streamoff(8 + hlen + e.begin));
    in.read(static_cast<char*>(t.raw()), std::streamsize(e.end - e.begin));
    MV_CHECK(in, "load_safetensors '", path, "': could not read tensor '", e.name, "'");
    out.emplace(e.name, t);
  }
  return out;
}

}  // namespace mv
