// The one way moevit writes a file: into a temporary file beside the target, flushed, fsync'ed
// and checked at every step, then renamed over the target. A crash, a full disk or a kill leaves
// either the old file or the whole new one, never a truncated mix, and a failed write throws.
//
//   FileWriter w("runs/a/metrics.jsonl");  // refuses a folder, device or other special file
//   w.write(text.data(), text.size());     // throws naming the file on any error
//   w.commit();                            // flush, fsync, rename, fsync the folder
//
// A writer destroyed before commit() removes its temporary file. The temporary file of a
// process that died mid-write (path + ".tmp." + its pid) is removed by the next writer of the
// same path, or by remove_stale_temps.
#pragma once
#include <cstddef>
#include <cstdio>
#include <string>
#include <string_view>

namespace mv {

class FileWriter {
 public:
  explicit FileWriter(std::string path);
  ~FileWriter();
  FileWriter(const FileWriter&) = delete;
  FileWriter& operator=(const FileWriter&) = delete;

  void write(const void* data, size_t n);
  void commit();

 private:
  std::string path_, tmp_;
  FILE* f_ = nullptr;
};

// The whole file at once.
void write_file(const std::string& path, std::string_view bytes);

// Throws unless `path` is absent or a regular file: writing replaces it by a rename, which must
// never swap out a folder, a device such as /dev/null or a pipe. `what` names the flag or file
// kind in the message.
void check_writable_path(const std::string& path, const std::string& what);

// Removes path's temporary files left by processes that are no longer running; returns how many.
int remove_stale_temps(const std::string& path);

}  // namespace mv
