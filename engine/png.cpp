#include "engine/png.h"

#include "engine/error.h"

// The one definition of stb_image_write in the project.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#pragma GCC diagnostic pop

namespace mv {

void write_png(const std::string& path, int w, int h, const std::vector<uint8_t>& rgb) {
  MV_CHECK(w > 0 && h > 0, "write_png: '", path, "': image size ", w, " x ", h,
           " must be positive");
  MV_CHECK(rgb.size() == size_t(w) * size_t(h) * 3, "write_png: '", path, "': ", rgb.size(),
           " bytes for a ", w, " x ", h, " RGB image, expected ", size_t(w) * size_t(h) * 3);
  MV_CHECK(stbi_write_png(path.c_str(), w, h, 3, rgb.data(), w * 3) != 0, "write_png: cannot write '",
           path, "'");
}

}  // namespace mv
