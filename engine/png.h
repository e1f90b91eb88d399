// PNG output (stb_image_write; its implementation lives in engine/png.cpp only, so every other
// file that needs PNGs includes this header instead of stb).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mv {

// rgb: h rows of w pixels, 3 bytes (R, G, B) each, top row first. Throws mv::Error naming the
// path when the sizes disagree or the file cannot be written.
void write_png(const std::string& path, int w, int h, const std::vector<uint8_t>& rgb);

}  // namespace mv
