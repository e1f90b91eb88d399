#include "train/stop.h"

#include <csignal>
#include <unistd.h>

namespace mv::train {
namespace {

volatile std::sig_atomic_t g_signal = 0;

// Only async-signal-safe calls here: write(2) and _exit(2).
extern "C" void on_stop_signal(int sig) {
  if (g_signal != 0) _exit(128 + sig);
  g_signal = sig;
  static const char msg[] =
      "\nstopping after the current step (a checkpoint follows); signal again to quit at once\n";
  [[maybe_unused]] const ssize_t n = write(STDERR_FILENO, msg, sizeof msg - 1);
}

}  // namespace

void install_stop_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // a read or write in flight completes; the loop checks the flag
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

int stop_signal() { return g_signal; }
void request_stop(int signal) { g_signal = signal; }

const char* signal_name(int signal) {
  switch (signal) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    default: return "a signal";
  }
}

}  // namespace mv::train
