#include "engine/file_write.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/error.h"

namespace mv {
namespace fs = std::filesystem;

namespace {

std::string temp_prefix(const std::string& path) { return path + ".tmp."; }

// The folder's entry for the renamed file reaches the disk only once the folder is synced.
bool sync_folder(const std::string& path) {
  const fs::path dir = fs::path(path).parent_path();
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return false;
  const bool ok = ::fsync(fd) == 0;
  ::close(fd);
  return ok;
}

}  // namespace

void check_writable_path(const std::string& path, const std::string& what) {
  MV_CHECK(!path.empty(), what, ": the file name is empty");
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    MV_CHECK(errno == ENOENT, what, ": cannot inspect '", path, "': ", std::strerror(errno));
    return;
  }
  const char* kind = S_ISDIR(st.st_mode)   ? "a folder"
                     : S_ISLNK(st.st_mode) ? "a symbolic link"
                     : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device"
                     : S_ISFIFO(st.st_mode) ? "a pipe"
                     : S_ISSOCK(st.st_mode) ? "a socket"
                                            : nullptr;
  MV_CHECK(!kind, what, ": '", path, "' is ", kind,
           "; moevit only replaces regular files (name a new or regular file)");
}

int remove_stale_temps(const std::string& path) {
  const fs::path p(path);
  const fs::path dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  const std::string prefix = p.filename().string() + ".tmp.";
  std::error_code ec;
  int removed = 0;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) != 0 || !e.is_regular_file(ec)) continue;
    const std::string digits = name.substr(prefix.size());
    if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos)
      continue;
    const pid_t pid = pid_t(std::stol(digits));
    // A live writer's file is left alone: kill(pid, 0) fails with ESRCH only for a dead one.
    if (pid == ::getpid() || ::kill(pid, 0) == 0 || errno != ESRCH) continue;
    removed += fs::remove(e.path(), ec) ? 1 : 0;
  }
  return removed;
}

FileWriter::FileWriter(std::string path) : path_(std::move(path)) {
  check_writable_path(path_, "writing");
  remove_stale_temps(path_);
  tmp_ = temp_prefix(path_) + std::to_string(::getpid());
  f_ = std::fopen(tmp_.c_str(), "wb");
  MV_CHECK(f_, "cannot write '", path_, "': opening '", tmp_, "' failed: ", std::strerror(errno));
}

FileWriter::~FileWriter() {
  if (!f_) return;
  std::fclose(f_);
  std::remove(tmp_.c_str());
}

void FileWriter::write(const void* data, size_t n) {
  MV_CHECK(f_, "cannot write '", path_, "': already committed");
  if (n == 0) return;
  errno = 0;
  if (std::fwrite(data, 1, n, f_) != n)
    MV_FAIL("cannot write '", path_, "': ", std::strerror(errno ? errno : EIO),
            " (the previous file, if any, is unchanged)");
}

void FileWriter::commit() {
  MV_CHECK(f_, "cannot write '", path_, "': already committed");
  errno = 0;
  bool ok = std::fflush(f_) == 0 && ::fsync(::fileno(f_)) == 0;
  const int err = errno;
  ok = std::fclose(f_) == 0 && ok;
  f_ = nullptr;
  if (!ok || std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int e = ok ? errno : (err ? err : errno);
    std::remove(tmp_.c_str());
    MV_FAIL("cannot write '", path_, "': ", std::strerror(e ? e : EIO),
            " (the previous file, if any, is unchanged)");
  }
  MV_CHECK(sync_folder(path_), "wrote '", path_, "' but could not sync its folder: ",
           std::strerror(errno));
}

void write_file(const std::string& path, std::string_view bytes) {
  FileWriter w(path);
  w.write(bytes.data(), bytes.size());
  w.commit();
}

}  // namespace mv
