#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <fmt/format.h>

#include "tsp/train/metrics.h"

namespace tsp {

Progress::Progress(int64_t first_step, int64_t total_steps, int64_t every, bool tty)
    : first_(first_step), total_(total_steps), every_(every > 0 ? every : 1), tty_(tty) {}

bool Progress::stdout_is_tty() {
  if (::isatty(STDOUT_FILENO) != 1) return false;
  // Under OpenMPI every rank's stdout is a pseudo-terminal that the launcher forwards, whatever
  // mpiexec's own stdout is. Ask the launcher (the parent process of a local rank) instead.
  if (std::getenv("OMPI_COMM_WORLD_SIZE") == nullptr) return true;
  const std::string link = "/proc/" + std::to_string(::getppid()) + "/fd/1";
  char target[256] = {};
  const ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
  if (n <= 0) return false;
  const std::string t(target, static_cast<size_t>(n));
  return t.rfind("/dev/pts/", 0) == 0 || t.rfind("/dev/tty", 0) == 0;
}

std::string Progress::format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60);
  return fmt::format("{:02}:{:02}", s / 60, s % 60);
}

void Progress::update(const StepMetrics& m) {
  // ETA from the average pace of this run (steps done since it started or resumed).
  const int64_t done = m.step - first_;
  const double eta = done > 0 ? m.elapsed_s / done * static_cast<double>(total_ - m.step) : NAN;
  std::string stats = fmt::format("step {}/{}  loss {:.4f}  lr {:.2e}  {:.0f} tok/s", m.step,
                                  total_, m.loss, m.lr, m.tokens_per_s);
  if (m.tokens_read_max >= 0) {  // what one rank read from the corpus this step
    stats += m.tokens_read_min == m.tokens_read_max
                 ? fmt::format("  read {} tok/rank", m.tokens_read_max)
                 : fmt::format("  read {}-{} tok/rank", m.tokens_read_min, m.tokens_read_max);
  }
  stats += "  ETA " + format_duration(eta);
  if (tty_) {
    constexpr int kWidth = 24;
    const double frac = total_ > 0 ? static_cast<double>(m.step) / static_cast<double>(total_) : 1;
    const int filled = static_cast<int>(frac * kWidth);
    std::string bar(filled, '#');
    bar.resize(kWidth, '.');
    std::fprintf(stdout, "\r[%s] %s\x1b[K", bar.c_str(), stats.c_str());
    bar_drawn_ = true;
  } else if (m.step % every_ == 0 || m.step == total_ || m.step == first_ + 1) {
    std::fprintf(stdout, "%s  elapsed %s\n", stats.c_str(), format_duration(m.elapsed_s).c_str());
  }
  std::fflush(stdout);
}

void Progress::note(const std::string& line) {
  if (tty_ && bar_drawn_) {
    std::fprintf(stdout, "\r\x1b[K%s\n", line.c_str());
    bar_drawn_ = false;  // redrawn on the next update
  } else {
    std::fprintf(stdout, "%s\n", line.c_str());
  }
  std::fflush(stdout);
}

void Progress::finish() {
  if (tty_ && bar_drawn_) std::fprintf(stdout, "\n");
  bar_drawn_ = false;
  std::fflush(stdout);
}

}  // namespace tsp
