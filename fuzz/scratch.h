// The folder the fuzz targets write their inputs into: the readers under test take paths, so each
// input becomes a file. It lies on tmpfs (/dev/shm) where there is one, so no input touches a
// disk, is private to the process (fuzzers may run side by side), and is removed at exit.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <string>

namespace mv::fuzz {

inline const std::filesystem::path& scratch_dir() {
  namespace fs = std::filesystem;
  struct Dir {
    fs::path path;
    Dir() {
      const fs::path base =
          fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
      path = base / ("moevit-fuzz-" + std::to_string(getpid()));
      fs::create_directories(path);
    }
    ~Dir() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  };
  static const Dir dir;
  return dir.path;
}

}  // namespace mv::fuzz
