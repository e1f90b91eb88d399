// What the programs (train, eval, viz) share around their command lines: the --threads bound and
// one handler for whatever escapes their work, so every failure is a one-line message and a
// non-zero exit, never an uncaught exception or a crash.
#pragma once
#include <functional>
#include <string>

#include "engine/dtype.h"

namespace mv::cli {

// --threads n, when given: 1 to 4x the machine's cores (beyond that threads only wait for each
// other, and thousands of them stall the whole machine).
void set_threads(int n);

// --device cpu | cuda -> where the model runs; throws naming the flag for another name, or for
// cuda without a device.
Device parse_device(const std::string& name);

// Runs `work` and returns its exit code; an exception that escapes it is printed as
// "PROGRAM: error: ..." on stderr and gives 1 (an out-of-memory one says which sizes to lower).
int guarded(const char* program, const std::function<int()>& work);

}  // namespace mv::cli
