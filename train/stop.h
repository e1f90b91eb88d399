// A graceful stop for long runs. After install_stop_handlers(), the first SIGINT (Ctrl-C) or
// SIGTERM only raises a flag: the training loop finishes its current step, writes a checkpoint
// and the metrics line, says how to resume, and the program exits with 128 + the signal's number
// (130 for SIGINT, 143 for SIGTERM, as shells report a killed process). A second signal ends the
// process at once; the checkpoint on disk is then the last one fully written (writes are atomic).
#pragma once

namespace mv::train {

void install_stop_handlers();

// 0 until a stop was asked for; then the signal's number. request_stop raises it by hand (tests).
int stop_signal();
void request_stop(int signal);

// "SIGINT", "SIGTERM", or "a signal".
const char* signal_name(int signal);

}  // namespace mv::train
