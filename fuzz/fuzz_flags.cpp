// libFuzzer target for train's command line (apps/train_flags.h): the input, split at NUL bytes,
// is argv. Parsing, making the run configuration and validating it must either succeed or throw
// the two errors main reports (CLI::Error for the parser, mv::Error for a value no run can
// take); anything else escaping, or a crash, is a finding.
#include <CLI/CLI.hpp>
#include <string>
#include <vector>

#include "apps/train_flags.h"
#include "engine/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> args = {"train"};
  std::string arg;
  for (size_t i = 0; i < size; ++i) {
    if (data[i] != 0) {
      arg += static_cast<char>(data[i]);
    } else {
      args.push_back(arg), arg.clear();
    }
  }
  if (!arg.empty()) args.push_back(arg);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());

  // The parser is built once (80-odd options); each input starts from a cleared parse and
  // default settings, as a fresh process would.
  static mv::cli::TrainFlags flags;
  static CLI::App& app = *[] {
    auto* a = new CLI::App{"train"};
    mv::cli::add_train_flags(*a, flags);
    return a;
  }();
  app.clear();
  flags = mv::cli::TrainFlags{};
  try {
    app.parse(static_cast<int>(argv.size()), argv.data());
    mv::cli::train_config(app, flags).validate();
  } catch (const CLI::Error&) {
  } catch (const mv::Error&) {
  }
  return 0;
}
