#include "cli/signal_watcher.h"

#include <pthread.h>
#include <signal.h>

#include <cerrno>
#include <ctime>

namespace fmwire::cli {

namespace {

sigset_t watched_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

}  // namespace

SignalWatcher::SignalWatcher(std::function<void(int signal, int count)> on_signal) {
  const sigset_t set = watched_signals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  thread_ = std::thread([this, set, on_signal = std::move(on_signal)] {
    // Named so that a test can tell it from the threads that must block the
    // signals: while it waits in sigtimedwait the kernel shows them unblocked.
    pthread_setname_np(pthread_self(), "fmwire-signals");
    int count = 0;
    // A bounded wait, so that the destructor's stop is seen without a signal.
    const timespec tick{0, 50'000'000};
    while (!stopping_.load()) {
      const int signal = sigtimedwait(&set, nullptr, &tick);
      if (signal > 0) on_signal(signal, ++count);
    }
  });
}

SignalWatcher::~SignalWatcher() {
  stopping_.store(true);
  thread_.join();
}

}  // namespace fmwire::cli
