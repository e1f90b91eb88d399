// What the programs promise against hostile input and failing disks (docs/reliability.md): the
// checked writer, the bounds of flags and configurations, and the stale temp-file cleanup.
#include <CLI/CLI.hpp>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "apps/train_flags.h"
#include "engine/file_write.h"
#include "engine/memory.h"
#include "tests/helpers.h"

using namespace mv;
namespace fs = std::filesystem;

namespace {

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// A fresh empty folder under /tmp.
std::string scratch(const std::string& name) {
  const std::string dir = "/tmp/moevit_test_" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// The pid of a process that has exited and been reaped: no process has it (until reuse).
pid_t dead_pid() {
  const pid_t p = fork();
  if (p == 0) _exit(0);
  waitpid(p, nullptr, 0);
  return p;
}

// train's flags as main parses them; throws what train_config throws.
train::TrainConfig parse_train(std::vector<std::string> args) {
  CLI::App app;
  cli::TrainFlags f;
  cli::add_train_flags(app, f);
  std::reverse(args.begin(), args.end());  // CLI11 takes a reversed vector
  app.parse(args);
  return cli::train_config(app, f);
}

}  // namespace

TEST_CASE("the checked writer replaces a file whole, and only a regular file") {
  const std::string dir = scratch("writer");
  const std::string path = dir + "/out.txt";
  write_file(path, "first");
  write_file(path, "second, longer");
  CHECK(read_all(path) == "second, longer");
  CHECK(std::distance(fs::directory_iterator(dir), {}) == 1);  // no temp file left
  // A folder, a device, a pipe and a symbolic link are refused by name, untouched.
  CHECK_THROWS_WITH_AS(write_file(dir, "x"), doctest::Contains("is a folder"), Error);
  CHECK_THROWS_WITH_AS(write_file("/dev/null", "x"), doctest::Contains("'/dev/null' is a device"), Error);
  REQUIRE(mkfifo((dir + "/pipe").c_str(), 0600) == 0);
  CHECK_THROWS_WITH_AS(write_file(dir + "/pipe", "x"), doctest::Contains("is a pipe"), Error);
  fs::create_symlink(path, dir + "/link");
  CHECK_THROWS_WITH_AS(write_file(dir + "/link", "x"), doctest::Contains("is a symbolic link"), Error);
  CHECK(read_all(path) == "second, longer");
  // A writer given up before commit leaves nothing behind.
  {
    FileWriter w(dir + "/never.txt");
    w.write("abc", 3);
  }
  CHECK(!fs::exists(dir + "/never.txt"));
  CHECK(!fs::exists(dir + "/never.txt.tmp." + std::to_string(getpid())));
  fs::remove_all(dir);
}

TEST_CASE("a write that fails (a full disk) throws and keeps the previous file") {
  const std::string dir = scratch("writer_full");
  const std::string path = dir + "/checkpoint.bin";
  write_file(path, "the good old checkpoint");
  // RLIMIT_FSIZE makes writes past 4 KiB fail with EFBIG, as a full disk fails them with ENOSPC.
  std::signal(SIGXFSZ, SIG_IGN);
  rlimit old{};
  getrlimit(RLIMIT_FSIZE, &old);
  rlimit small = old;
  small.rlim_cur = 4096;
  REQUIRE(setrlimit(RLIMIT_FSIZE, &small) == 0);
  const std::string big(1 << 20, 'x');
  std::string message;
  try {
    write_file(path, big);
  } catch (const Error& e) {
    message = e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, SIG_DFL);
  CHECK(message.find("cannot write '" + path + "'") != std::string::npos);
  CHECK(message.find("the previous file, if any, is unchanged") != std::string::npos);
  CHECK(read_all(path) == "the good old checkpoint");
  CHECK(std::distance(fs::directory_iterator(dir), {}) == 1);
  // The same through a descriptor of /dev/full, whose every write fails with ENOSPC.
  FILE* full = std::fopen("/dev/full", "wb");
  if (full) {
    setvbuf(full, nullptr, _IONBF, 0);
    CHECK(std::fwrite("x", 1, 1, full) == 0);
    CHECK(errno == ENOSPC);
    std::fclose(full);
  }
  fs::remove_all(dir);
}

TEST_CASE("temp files of a writer that died are removed; a live writer's are kept") {
  const std::string dir = scratch("stale");
  const std::string path = dir + "/checkpoint.safetensors";
  const std::string dead = path + ".tmp." + std::to_string(dead_pid());
  const std::string live = path + ".tmp." + std::to_string(getppid());
  const std::string other = dir + "/notes.tmp.txt";
  for (const std::string& p : {dead, live, other}) std::ofstream(p) << "partial";
  CHECK(remove_stale_temps(path) == 1);
  CHECK(!fs::exists(dead));
  CHECK(fs::exists(live));
  CHECK(fs::exists(other));
  // The next write of the same file cleans up too.
  const std::string dead2 = path + ".tmp." + std::to_string(dead_pid());
  std::ofstream(dead2) << "partial";
  write_file(path, "whole");
  CHECK(!fs::exists(dead2));
  fs::remove_all(dir);
}

TEST_CASE("train's flags: 0, negative, non-finite and oversized values are refused by name") {
  const std::vector<std::string> base = {"--dataset", "synthetic", "--model", "vmoe-tiny"};
  auto refused = [&](std::vector<std::string> extra, const std::string& message) {
    std::vector<std::string> args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    std::string what;
    try {
      parse_train(args).validate();
    } catch (const Error& e) {
      what = e.what();
    }
    INFO(extra[0], " ", extra.size() > 1 ? extra[1] : "");
    CHECK(what.find(message) != std::string::npos);
  };
  refused({"--threads", "0"}, "--threads must be in 1..");
  refused({"--threads", "1000000"}, "--threads must be in 1..");
  refused({"--stop-after", "0"}, "--stop-after must be at least 1");
  refused({"--limit-train", "-1"}, "--limit-train must be at least 1");
  refused({"--limit-test", "0"}, "--limit-test must be at least 1");
  refused({"--epochs", "0"}, "--epochs must be in 1..100000");
  refused({"--batch", "1000000"}, "--batch must be in 1..65536");
  refused({"--eval-batch", "-3"}, "--eval-batch must be in 1..65536");
  refused({"--lr", "nan"}, "--lr must be positive and finite");
  refused({"--lr", "inf"}, "--lr must be positive and finite");
  refused({"--weight-decay", "inf"}, "--weight-decay must be finite");
  refused({"--momentum", "1"}, "--momentum must be in [0, 1)");
  refused({"--warmup", "nan"}, "--warmup must be in 0..--epochs");
  refused({"--clip", "inf"}, "--clip must be finite");
  refused({"--prc", "--prc-off-weight", "inf"}, "--prc-off-weight must be finite");
  refused({"--jaccard-weight", "nan"}, "--jaccard-weight must be finite");
  refused({"--depth", "100000000"}, "depth 100000000");
  refused({"--dim", "60000", "--heads", "1"}, "GiB of memory available");
  refused({"--batch", "60000"}, "training with --batch 60000");
  refused({"--experts", "100000"}, "experts (--experts) = 100000");
  refused({"--capacity", "1e9"}, "capacity_train (--capacity) = 1e+09");
  refused({"--noise-std", "inf"}, "noise_std (--noise-std) = inf");
  refused({"--importance-weight", "nan"}, "importance_weight (--importance-weight) = nan");
  CHECK_NOTHROW(parse_train(base).validate());
  CHECK_THROWS_WITH_AS(parse_train({"--resume", "runs/x", "--epochs", "3"}),
                       doctest::Contains("--epochs cannot be changed"), Error);
  CHECK_NOTHROW(parse_train({"--resume", "runs/x", "--threads", "1", "--stop-after", "2"}));
  // What CLI11 cannot convert is its own error, which main prints with the flag's name.
  CHECK_THROWS_AS(parse_train({"--epochs", "ten"}), CLI::ParseError);
}

TEST_CASE("sizes from user input are checked against the available memory") {
  CHECK(available_memory_bytes() > double(1 << 20));
  CHECK_NOTHROW(check_fits_memory(1024, "a small thing"));
  CHECK_THROWS_WITH_AS(check_fits_memory(1e18, "--images 5"),
                       doctest::Contains("--images 5 needs about 931322574.6 GiB"), Error);
}
