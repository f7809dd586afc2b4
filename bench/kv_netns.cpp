#include "kv_netns.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <utility>
#include <cstdio>
#include <string>

#include "child_process.h"
#include "transport_iperf.h"

namespace fmwire::bench {
namespace {

using namespace std::chrono_literals;

// Runs a command to its end: its exit status and what it printed.
struct CommandResult {
  int status = -1;
  std::string output;
};

CommandResult run_command(const std::string& path, const std::vector<std::string>& arguments) {
  ChildProcess child(path, arguments, true);
  CommandResult result;
  result.output = child.read_output(20'000ms);
  const std::optional<int> status = child.wait(5'000ms);
  result.status = status ? *status : -1;
  while (!result.output.empty() && result.output.back() == '\n') result.output.pop_back();
  return result;
}

std::string describe(const std::string& path, const std::vector<std::string>& arguments) {
  std::string text = path.substr(path.rfind('/') + 1);
  for (const std::string& argument : arguments) text += " " + argument;
  return text;
}

}  // namespace

// ---------------------------------------------------------------- signals

SignalCleanup::SignalCleanup() {
  // A shell starts background jobs with SIGINT ignored, and an ignored
  // signal never reaches sigwait: take SIGINT and SIGTERM back (SIGHUP
  // stays ignored under nohup).
  ::signal(SIGINT, SIG_DFL);
  ::signal(SIGTERM, SIG_DFL);
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  sigaddset(&signals, SIGUSR1);  // from the destructor: stop watching
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  thread_ = std::thread([this] { watch(); });
  thread_handle_ = thread_.native_handle();
}

SignalCleanup::~SignalCleanup() {
  pthread_kill(thread_handle_, SIGUSR1);
  thread_.join();
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_UNBLOCK, &signals, nullptr);  // any still pending now acts as usual
}

void SignalCleanup::watch() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  sigaddset(&signals, SIGUSR1);
  int signal = 0;
  for (;;) {
    if (sigwait(&signals, &signal) != 0) continue;
    if (signal == SIGUSR1) return;
    break;
  }
  std::lock_guard lock(mutex_);  // waits for a link being made or shaped
  for (NetnsLink* link : links_) link->remove();
  std::fprintf(stderr, "\nbench_kv: signal %d: removed the bench's network namespaces; exiting\n", signal);
  std::fflush(stdout);
  ::_exit(128 + signal);  // child processes die with us (PR_SET_PDEATHSIG)
}

// ---------------------------------------------------------------- the link

NetnsLink::NetnsLink(SignalCleanup& cleanup) : cleanup_(cleanup) {
  if (::geteuid() != 0) throw NetnsUnavailable("not root: network namespaces need CAP_NET_ADMIN");
  const std::optional<std::string> ip = find_on_path("ip");
  const std::optional<std::string> tc = find_on_path("tc");
  if (!ip || !tc) throw NetnsUnavailable("`ip` or `tc` not on PATH (apt-get install iproute2)");
  ip_path_ = *ip;
  tc_path_ = *tc;
  const std::string pid = std::to_string(::getpid());
  receiver_namespace_ = "fmkv-" + pid + "-r";
  sender_namespace_ = "fmkv-" + pid + "-s";
  receiver_device_ = "fmkv" + pid + "r";  // at most 12 characters: within IFNAMSIZ
  sender_device_ = "fmkv" + pid + "s";
  const std::string subnet = "10.213." + std::to_string(::getpid() % 256) + ".";
  receiver_address_ = subnet + "1";
  sender_address_ = subnet + "2";

  std::lock_guard lock(cleanup_.mutex_);
  cleanup_.links_.push_back(this);
  const std::vector<std::vector<std::string>> steps{
      {"netns", "add", receiver_namespace_},
      {"netns", "add", sender_namespace_},
      {"link", "add", sender_device_, "netns", sender_namespace_, "type", "veth", "peer", "name", receiver_device_,
       "netns", receiver_namespace_},
      {"-n", receiver_namespace_, "address", "add", receiver_address_ + "/30", "dev", receiver_device_},
      {"-n", sender_namespace_, "address", "add", sender_address_ + "/30", "dev", sender_device_},
      {"-n", receiver_namespace_, "link", "set", "lo", "up"},
      {"-n", sender_namespace_, "link", "set", "lo", "up"},
      {"-n", receiver_namespace_, "link", "set", receiver_device_, "up"},
      {"-n", sender_namespace_, "link", "set", sender_device_, "up"},
  };
  for (const std::vector<std::string>& step : steps) {
    const CommandResult result = run_command(ip_path_, step);
    if (result.status != 0) {
      remove();
      throw NetnsUnavailable(describe(ip_path_, step) + " failed (exit " + std::to_string(result.status) +
                             "): " + result.output);
    }
  }
  const CommandResult netem = run_command(tc_path_, {"-n", sender_namespace_, "qdisc", "add", "dev", sender_device_,
                                                     "root", "netem", "delay", "500us"});
  has_netem_ = netem.status == 0;
  if (has_netem_) run_command(tc_path_, {"-n", sender_namespace_, "qdisc", "del", "dev", sender_device_, "root"});
}

NetnsLink::~NetnsLink() {
  std::lock_guard lock(cleanup_.mutex_);
  remove();
  std::erase(cleanup_.links_, this);
}

void NetnsLink::remove() {
  if (removed_) return;
  removed_ = true;
  // The pair first (both ends go with either), then the namespaces; each
  // step whether or not the one before it worked, as far as it got.
  run_command(ip_path_, {"-n", sender_namespace_, "link", "del", sender_device_});
  run_command(ip_path_, {"netns", "del", sender_namespace_});
  run_command(ip_path_, {"netns", "del", receiver_namespace_});
}

void NetnsLink::shape(std::uint64_t rate_bits_per_s, std::uint32_t delay_us) {
  std::lock_guard lock(cleanup_.mutex_);
  // A bucket of 1 ms at the rate (at least 64 KiB, so that a GSO packet
  // passes whole), and at most 10 ms of queue.
  const std::string rate = std::to_string(rate_bits_per_s) + "bit";
  const std::string burst = std::to_string(std::max<std::uint64_t>(64 * 1024, rate_bits_per_s / 8 / 1000));
  auto run_tc = [&](const std::vector<std::string>& arguments) {
    const CommandResult result = run_command(tc_path_, arguments);
    if (result.status != 0) {
      throw std::runtime_error(describe(tc_path_, arguments) + " failed (exit " + std::to_string(result.status) +
                               "): " + result.output);
    }
  };
  for (const auto& [space, device] : {std::pair{sender_namespace_, sender_device_}, std::pair{receiver_namespace_, receiver_device_}}) {
    run_command(tc_path_, {"-n", space, "qdisc", "del", "dev", device, "root"});  // none yet is fine
    const bool delayed = delay_us > 0 && has_netem_ && space == sender_namespace_;
    if (delayed) {
      run_tc({"-n", space, "qdisc", "add", "dev", device, "root", "handle", "1:", "netem", "delay",
              std::to_string(delay_us) + "us", "limit", "100000"});
      run_tc({"-n", space, "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", "tbf", "rate", rate,
              "burst", burst, "latency", "10ms"});
    } else {
      run_tc({"-n", space, "qdisc", "add", "dev", device, "root", "tbf", "rate", rate, "burst", burst, "latency", "10ms"});
    }
  }
}

std::vector<std::string> NetnsLink::exec_prefix(const std::string& namespace_name) const {
  return {ip_path_, "netns", "exec", namespace_name};
}

}  // namespace fmwire::bench
