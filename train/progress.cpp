#include "train/progress.h"

#include <algorithm>
#include <unistd.h>

namespace mv::train {

Progress::Progress(FILE* out, int epoch, int epochs, int64_t total)
    : out_(out), epoch_(epoch), epochs_(epochs), total_(total), tty_(out && isatty(fileno(out))) {}

void Progress::update(int64_t done, double loss, double acc, double img_s, double eta) {
  if (!out_) return;
  const bool last = done == total_;
  if (!tty_ && !last && done % std::max<int64_t>(total_ / 10, 1) != 0) return;
  char bar[21];
  const int fill = int(20 * done / std::max<int64_t>(total_, 1));
  for (int i = 0; i < 20; ++i) bar[i] = i < fill ? '=' : (i == fill ? '>' : ' ');
  bar[20] = 0;
  const std::string of = epochs_ > 0 ? std::to_string(epochs_) : "?";
  std::fprintf(out_, "%sepoch %d/%s [%s] %lld/%lld loss %.4f acc %.2f%% %.0f img/s ETA %s%s",
               tty_ ? "\r" : "", epoch_, of.c_str(), bar, (long long)done, (long long)total_, loss,
               100 * acc, img_s, format_seconds(eta).c_str(), tty_ ? (last ? "\n" : "") : "\n");
  std::fflush(out_);
}

std::string format_seconds(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.1fs", s);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%dm%02ds", int(s) / 60, int(s) % 60);
  else std::snprintf(buf, sizeof buf, "%dh%02dm", int(s) / 3600, int(s) % 3600 / 60);
  return buf;
}

}  // namespace mv::train
