// The one exception type of moevit, and the check macro every layer uses.
// Messages name the op or file, the shapes or values seen, and what was expected.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace mv {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Args>
[[noreturn]] void fail(const char* file, int line, const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  os << " [" << file << ":" << line << "]";
  throw Error(os.str());
}
}  // namespace detail

}  // namespace mv

// MV_CHECK(cond, "matmul: ", a.shape_str(), " x ", b.shape_str(), ": inner sizes differ")
#define MV_CHECK(cond, ...)                                            \
  do {                                                                 \
    if (!(cond)) ::mv::detail::fail(__FILE__, __LINE__, __VA_ARGS__);  \
  } while (0)

#define MV_FAIL(...) ::mv::detail::fail(__FILE__, __LINE__, __VA_ARGS__)
