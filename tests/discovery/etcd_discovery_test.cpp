// Worker discovery against a real etcd (Debian's etcd-server, which
// scripts/setup.sh installs) started on loopback ports by the test. Without
// an etcd binary the tests fail rather than skip: a skipped test hides
// breakage.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "discovery/etcd_discovery.h"

namespace fmwire::discovery {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using Addresses = std::vector<std::string>;

// Bounds, not expected durations: every wait ends as soon as its condition holds.
constexpr auto kLimit = 10s;

std::string find_program(const std::string& name) {
  if (const char* path = std::getenv("PATH")) {
    std::stringstream dirs(path);
    for (std::string dir; std::getline(dirs, dir, ':');) {
      const auto candidate = std::filesystem::path(dir) / name;
      if (!dir.empty() && ::access(candidate.c_str(), X_OK) == 0) return candidate;
    }
  }
  const std::string fallback = "/usr/bin/" + name;
  return ::access(fallback.c_str(), X_OK) == 0 ? fallback : std::string();
}

// A port free now: bound to port 0, read back, closed.
std::uint16_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  const bool bound = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0 &&
                     ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  ::close(fd);
  REQUIRE(bound);
  return ntohs(address.sin_port);
}

// Runs a shell command (etcdctl, which bounds its own waits), its output.
std::string run_command(const std::string& command, int* exit_status = nullptr) {
  std::string output;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  REQUIRE_MESSAGE(pipe != nullptr, "cannot run: ", command);
  char buffer[4096];
  for (std::size_t n; (n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0;) output.append(buffer, n);
  const int status = ::pclose(pipe);
  if (exit_status != nullptr) *exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return output;
}

// Test certificates made now by tests/make_test_certs.sh (its path in
// FMWIRE_TEST_CERTS, set by meson) into a temporary directory, removed at
// the end: ca.pem, server.*, client.*, other-ca.pem, other-client.*.
class TestCertificates {
 public:
  TestCertificates() {
    const char* script = std::getenv("FMWIRE_TEST_CERTS");
    REQUIRE_MESSAGE(script != nullptr, "FMWIRE_TEST_CERTS is not set: run through meson test");
    std::string pattern = (std::filesystem::temp_directory_path() / "fmwire-certs-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    dir_ = pattern;
    int status = 0;
    const std::string output = run_command(std::string(script) + " " + dir_.string(), &status);
    REQUIRE_MESSAGE(status == 0, "making test certificates failed: ", output);
  }
  TestCertificates(const TestCertificates&) = delete;
  TestCertificates& operator=(const TestCertificates&) = delete;
  ~TestCertificates() {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }
  // A client's files: the CA that signed etcd's certificate, and `client`'s
  // certificate and key ("client" or "other-client").
  EtcdTlsFiles client(const std::string& client = "client", const std::string& ca = "ca") const {
    return {file(ca + ".pem"), file(client + ".pem"), file(client + ".key")};
  }

 private:
  std::filesystem::path dir_;
};

// One etcd on loopback ports with its own temporary data directory, stopped
// (SIGTERM, then SIGKILL) and removed when the object goes, whatever the
// test's outcome. PR_SET_PDEATHSIG kills it should the test binary itself die.
class EtcdProcess {
 public:
  // With `certificates`: https only, etcd's own certificate server.pem, and
  // --client-cert-auth trusting ca.pem.
  explicit EtcdProcess(const TestCertificates* certificates = nullptr)
      : certificates_(certificates), client_port_(free_port()), peer_port_(free_port()) {
    while (peer_port_ == client_port_) peer_port_ = free_port();
    binary_ = find_program("etcd");
    REQUIRE_MESSAGE(!binary_.empty(),
                    "no etcd binary on PATH or at /usr/bin/etcd: install etcd-server and etcd-client "
                    "(scripts/setup.sh does)");
    etcdctl_ = find_program("etcdctl");
    REQUIRE_MESSAGE(!etcdctl_.empty(), "no etcdctl on PATH or at /usr/bin/etcdctl: install etcd-client");
    std::string pattern = (std::filesystem::temp_directory_path() / "fmwire-etcd-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    dir_ = pattern;
    start();
  }

  EtcdProcess(const EtcdProcess&) = delete;
  EtcdProcess& operator=(const EtcdProcess&) = delete;

  ~EtcdProcess() {
    stop();
    std::error_code ignored;  // a leftover temp directory fails no test
    std::filesystem::remove_all(dir_, ignored);
  }

  EtcdUrl url() const { return {"127.0.0.1", client_port_, nullptr}; }
  // The https URL, parsed with `files` (TLS etcd only).
  EtcdUrl url(const EtcdTlsFiles& files) const {
    auto parsed = parse_etcd_url(endpoint(), files);
    REQUIRE_MESSAGE(parsed.has_value(), parsed.error());
    return std::move(parsed).value();
  }
  std::string endpoint() const {
    return (certificates_ ? "https://127.0.0.1:" : "http://127.0.0.1:") + std::to_string(client_port_);
  }

  // Starts etcd on this object's ports and data directory and waits until it
  // answers.
  void start() {
    REQUIRE(pid_ < 0);
    const std::string client = endpoint();
    const std::string peer = "http://127.0.0.1:" + std::to_string(peer_port_);
    std::vector<std::string> args = {binary_,
                                     "--name=default",
                                     "--data-dir=" + (dir_ / "data").string(),
                                     "--listen-client-urls=" + client,
                                     "--advertise-client-urls=" + client,
                                     "--listen-peer-urls=" + peer,
                                     "--initial-advertise-peer-urls=" + peer,
                                     "--initial-cluster=default=" + peer,
                                     // One member: elect it in ~0.1 s, not ~1 s.
                                     "--heartbeat-interval=10",
                                     "--election-timeout=100"};
    if (certificates_) {
      args.push_back("--cert-file=" + certificates_->file("server.pem"));
      args.push_back("--key-file=" + certificates_->file("server.key"));
      args.push_back("--client-cert-auth");
      args.push_back("--trusted-ca-file=" + certificates_->file("ca.pem"));
    }
    std::vector<char*> argv;
    for (auto& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    const std::string log = (dir_ / "etcd.log").string();
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      const int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      if (out >= 0) {
        ::dup2(out, STDOUT_FILENO);
        ::dup2(out, STDERR_FILENO);
      }
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    pid_ = pid;
    const auto deadline = Clock::now() + kLimit;
    for (;;) {
      int status = 0;
      const std::string health = ctl("endpoint health", &status);
      if (status == 0) return;
      int child_status = 0;
      if (::waitpid(pid_, &child_status, WNOHANG) == pid_) {
        pid_ = -1;
        FAIL("etcd exited at start; its log:\n", log_tail());
      }
      if (Clock::now() > deadline) FAIL("etcd did not answer in 10 s: ", health, "\nits log:\n", log_tail());
      std::this_thread::sleep_for(20ms);
    }
  }

  // Stops etcd: SIGTERM, and SIGKILL when it has not exited within 3 s.
  void stop() {
    if (pid_ < 0) return;
    ::kill(pid_, SIGTERM);
    const auto deadline = Clock::now() + 3s;
    int status = 0;
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
      if (Clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(10ms);
    }
    pid_ = -1;
  }

  // What etcd loses when its machine is replaced: every key and lease.
  void wipe_data() {
    REQUIRE(pid_ < 0);
    std::filesystem::remove_all(dir_ / "data");
  }

  // etcdctl against this etcd: the raw API, independent of the code under test.
  std::string ctl(const std::string& arguments, int* exit_status = nullptr) const {
    const std::string tls = certificates_ ? " --cacert=" + certificates_->file("ca.pem") +
                                                " --cert=" + certificates_->file("client.pem") +
                                                " --key=" + certificates_->file("client.key")
                                          : std::string();
    return run_command("ETCDCTL_API=3 " + etcdctl_ + " --endpoints=" + endpoint() + tls +
                           " --dial-timeout=1s --command-timeout=2s " + arguments,
                       exit_status);
  }

 private:
  std::string log_tail() const {
    std::ifstream in(dir_ / "etcd.log");
    std::stringstream text;
    text << in.rdbuf();
    const std::string all = text.str();
    return all.size() > 3000 ? all.substr(all.size() - 3000) : all;
  }

  const TestCertificates* certificates_;
  std::uint16_t client_port_;
  std::uint16_t peer_port_;
  std::string binary_;
  std::string etcdctl_;
  std::filesystem::path dir_;
  pid_t pid_ = -1;
};

// One etcd for the cases that do not restart it (each uses its own key
// prefix); stopped at exit.
EtcdProcess& shared_etcd() {
  static EtcdProcess etcd;
  return etcd;
}

// What a watcher has told, for waiting on from the test's thread.
class Recorder {
 public:
  EtcdWatcher::Changed changed() {
    return [this](const Addresses& addresses) {
      std::lock_guard lock(mutex_);
      sets_.push_back(addresses);
      signal_.notify_all();
    };
  }
  EtcdWatcher::Error error() {
    return [this](const std::string& message) {
      std::lock_guard lock(mutex_);
      errors_.push_back(message);
      signal_.notify_all();
    };
  }

  // Whether the latest set reported is `expected`, waiting up to kLimit.
  bool wait_for(const Addresses& expected) {
    std::unique_lock lock(mutex_);
    return signal_.wait_for(lock, kLimit, [&] { return !sets_.empty() && sets_.back() == expected; });
  }
  bool wait_for_error() {
    std::unique_lock lock(mutex_);
    return signal_.wait_for(lock, kLimit, [&] { return !errors_.empty(); });
  }

  std::vector<Addresses> sets() {
    std::lock_guard lock(mutex_);
    return sets_;
  }
  std::vector<std::string> errors() {
    std::lock_guard lock(mutex_);
    return errors_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable signal_;
  std::vector<Addresses> sets_;
  std::vector<std::string> errors_;
};

std::unique_ptr<EtcdWatcher> watch(const EtcdUrl& url, const std::string& prefix, Recorder& recorder) {
  auto watcher = EtcdWatcher::start(url, prefix, recorder.changed(), recorder.error());
  REQUIRE_MESSAGE(watcher.has_value(), watcher.error());
  return std::move(watcher).value();
}

std::unique_ptr<EtcdRegistration> register_worker(const EtcdUrl& url, const std::string& prefix,
                                                  const std::string& address, std::chrono::seconds ttl = 30s) {
  auto registration = EtcdRegistration::start(url, prefix, address, ttl);
  REQUIRE_MESSAGE(registration.has_value(), registration.error());
  return std::move(registration).value();
}

std::string joined(const std::vector<std::string>& lines) {
  std::string text;
  for (const auto& line : lines) text += line + "\n";
  return text;
}

TEST_CASE("parse_etcd_url accepts http with a numeric host or a name") {
  auto v4 = parse_etcd_url("http://127.0.0.1:2379");
  REQUIRE_MESSAGE(v4.has_value(), v4.error());
  CHECK(v4->host == "127.0.0.1");
  CHECK(v4->port == 2379);

  auto v6 = parse_etcd_url("http://[::1]:12379/");
  REQUIRE_MESSAGE(v6.has_value(), v6.error());
  CHECK(v6->host == "::1");
  CHECK(v6->port == 12379);

  auto local = parse_etcd_url("http://localhost:2380");
  REQUIRE_MESSAGE(local.has_value(), local.error());
  CHECK(local->host == "localhost");
  CHECK(local->port == 2380);

  auto named = parse_etcd_url("http://etcd-0.etcd.svc:2379");
  REQUIRE_MESSAGE(named.has_value(), named.error());
  CHECK(named->host == "etcd-0.etcd.svc");

  auto v6_no_port = parse_etcd_url("http://[::1]");
  REQUIRE_MESSAGE(v6_no_port.has_value(), v6_no_port.error());
  CHECK(v6_no_port->host == "::1");
  CHECK(v6_no_port->port == 2379);

  auto no_port = parse_etcd_url("http://10.0.0.7");
  REQUIRE_MESSAGE(no_port.has_value(), no_port.error());
  CHECK(no_port->port == 2379);
}

TEST_CASE("parse_etcd_url takes https with the system's CAs or given files, and refuses files for http") {
  auto system = parse_etcd_url("https://etcd-0.etcd.svc:2379");
  REQUIRE_MESSAGE(system.has_value(), system.error());
  CHECK(system->tls != nullptr);
  CHECK(system->host == "etcd-0.etcd.svc");
  CHECK(parse_etcd_url("http://127.0.0.1:2379")->tls == nullptr);

  auto for_http = parse_etcd_url("http://127.0.0.1:2379", {"/some/ca.pem", "", ""});
  REQUIRE_FALSE(for_http.has_value());
  CHECK(for_http.error().find("are for https:// endpoints") != std::string::npos);
  auto no_key = parse_etcd_url("https://127.0.0.1:2379", {"", "/some/client.pem", ""});
  REQUIRE_FALSE(no_key.has_value());
  CHECK(no_key.error().find("--etcd-cert and --etcd-key go together") != std::string::npos);
  auto no_ca = parse_etcd_url("https://127.0.0.1:2379", {"/nonexistent/ca.pem", "", ""});
  REQUIRE_FALSE(no_ca.has_value());
  CHECK(no_ca.error().find("--etcd-cacert /nonexistent/ca.pem: cannot use it as a CA") != std::string::npos);

  TestCertificates certificates;
  auto wrong_key = parse_etcd_url("https://127.0.0.1:2379",
                                  {certificates.file("ca.pem"), certificates.file("client.pem"),
                                   certificates.file("other-client.key")});
  REQUIRE_FALSE(wrong_key.has_value());
  CHECK(wrong_key.error().find("other-client.key") != std::string::npos);
}

TEST_CASE("parse_etcd_url refuses other schemes, malformed hosts, paths and bad ports") {
  const auto refusal = [](const std::string& url) {
    auto parsed = parse_etcd_url(url);
    REQUIRE_MESSAGE(!parsed.has_value(), url, " parsed");
    return parsed.error();
  };
  CHECK(refusal("127.0.0.1:2379").find("expected http://HOST:PORT") != std::string::npos);
  CHECK(refusal("grpc://127.0.0.1:2379").find("expected http://HOST:PORT") != std::string::npos);
  CHECK(refusal("http://").find("expected a host") != std::string::npos);
  CHECK(refusal("http://etcd example:2379").find("character") != std::string::npos);
  CHECK(refusal("http://::1:2379").find("brackets") != std::string::npos);
  CHECK(refusal("http://127.0.0.1:2379/v3").find("no path") != std::string::npos);
  CHECK(refusal("http://127.0.0.1:http").find("port must be") != std::string::npos);
  CHECK(refusal("http://127.0.0.1:65536").find("port must be") != std::string::npos);
  CHECK(refusal("http://127.0.0.1:0").find("port must be") != std::string::npos);
  CHECK(refusal("http://[::1:2379").find("[IPv6]:PORT") != std::string::npos);
}

TEST_CASE("starting against a port with no etcd fails and says why") {
  const std::uint16_t port = free_port();
  const std::string expected = "cannot reach etcd at 127.0.0.1:" + std::to_string(port) + ": connection refused";
  Recorder recorder;
  auto watcher = EtcdWatcher::start({"127.0.0.1", port, nullptr}, "/workers/", recorder.changed(), recorder.error());
  REQUIRE(!watcher.has_value());
  CHECK(watcher.error() == expected);
  auto registration = EtcdRegistration::start({"127.0.0.1", port, nullptr}, "/workers/", "127.0.0.1:7000", 10s);
  REQUIRE(!registration.has_value());
  CHECK(registration.error() == expected);
  CHECK(recorder.sets().empty());
}

TEST_CASE("an etcd whose name does not resolve fails to start, naming the name") {
  Recorder recorder;
  const auto started = Clock::now();
  auto watcher = EtcdWatcher::start({"etcd.invalid", 2379, nullptr}, "/workers/", recorder.changed(), recorder.error());
  REQUIRE(!watcher.has_value());
  CHECK_MESSAGE(watcher.error().find("cannot reach etcd at etcd.invalid:2379: looking up etcd.invalid: ") == 0,
                watcher.error());
  auto registration = EtcdRegistration::start({"etcd.invalid", 2379, nullptr}, "/workers/", "127.0.0.1:7000", 10s);
  REQUIRE(!registration.has_value());
  CHECK_MESSAGE(registration.error().find("etcd.invalid") != std::string::npos, registration.error());
  CHECK(Clock::now() - started < kLimit);
}

TEST_CASE("workers register and are watched through etcd by the name localhost") {
  EtcdProcess& etcd = shared_etcd();
  const EtcdUrl by_name{"localhost", etcd.url().port, nullptr};
  const std::string prefix = "/fmwire-test/by-name/";
  Recorder recorder;
  auto watcher = watch(by_name, prefix, recorder);
  CHECK(recorder.wait_for({}));
  auto worker = register_worker(by_name, prefix, "worker-1.example:7001");
  CHECK(recorder.wait_for({"worker-1.example:7001"}));
  CHECK(recorder.errors().empty());
}

TEST_CASE("a registered worker appears to a watcher") {
  EtcdProcess& etcd = shared_etcd();
  const std::string prefix = "/fmwire-test/appears/";
  Recorder recorder;
  auto watcher = watch(etcd.url(), prefix, recorder);
  CHECK(recorder.wait_for({}));
  auto worker = register_worker(etcd.url(), prefix, "127.0.0.1:7001");
  CHECK(recorder.wait_for({"127.0.0.1:7001"}));
  // The key is the prefix and the address, under a lease.
  CHECK(etcd.ctl("get --prefix " + prefix).find(prefix + "127.0.0.1:7001\n127.0.0.1:7001") != std::string::npos);
  CHECK(recorder.errors().empty());
}

TEST_CASE("a watcher started after two registrations lists both, sorted, then a third") {
  EtcdProcess& etcd = shared_etcd();
  const std::string prefix = "/fmwire-test/both/";
  auto second = register_worker(etcd.url(), prefix, "127.0.0.1:7002");
  auto first = register_worker(etcd.url(), prefix, "127.0.0.1:7001");
  // A key beside the prefix ("/both0" after "/both/") is not a worker.
  int status = 0;
  etcd.ctl("put /fmwire-test/both0 127.0.0.1:9999", &status);
  REQUIRE(status == 0);
  Recorder recorder;
  auto watcher = watch(etcd.url(), prefix, recorder);
  CHECK(recorder.wait_for({"127.0.0.1:7001", "127.0.0.1:7002"}));
  CHECK(recorder.sets().front() == Addresses{"127.0.0.1:7001", "127.0.0.1:7002"});
  auto third = register_worker(etcd.url(), prefix, "[::1]:7003");
  CHECK(recorder.wait_for({"127.0.0.1:7001", "127.0.0.1:7002", "[::1]:7003"}));
  CHECK(recorder.errors().empty());
}

TEST_CASE("a registration outlives its ttl by renewing the same lease") {
  EtcdProcess& etcd = shared_etcd();
  const std::string prefix = "/fmwire-test/renewed/";
  Recorder recorder;
  auto watcher = watch(etcd.url(), prefix, recorder);
  auto worker = register_worker(etcd.url(), prefix, "127.0.0.1:7001", 1s);
  REQUIRE(recorder.wait_for({"127.0.0.1:7001"}));
  const auto lease_of_key = [&] {
    int status = 0;
    const std::string answer = etcd.ctl("get -w json " + prefix + "127.0.0.1:7001", &status);
    REQUIRE_MESSAGE(status == 0, answer);
    const auto at = answer.find("\"lease\":");
    REQUIRE_MESSAGE(at != std::string::npos, answer);
    return answer.substr(at, answer.find_first_of(",}", at) - at);
  };
  const std::string lease = lease_of_key();
  // Three times the ttl: a lease not renewed would have ended twice over.
  std::this_thread::sleep_for(3s);
  CHECK(lease_of_key() == lease);
  CHECK(recorder.sets().size() == 2);  // {} at start, then the worker; never a removal
  CHECK(recorder.errors().empty());
}

TEST_CASE("a destroyed registration disappears at once, not when its lease would end") {
  EtcdProcess& etcd = shared_etcd();
  const std::string prefix = "/fmwire-test/destroyed/";
  Recorder recorder;
  auto watcher = watch(etcd.url(), prefix, recorder);
  auto staying = register_worker(etcd.url(), prefix, "127.0.0.1:7001", 60s);
  auto leaving = register_worker(etcd.url(), prefix, "127.0.0.1:7002", 60s);
  REQUIRE(recorder.wait_for({"127.0.0.1:7001", "127.0.0.1:7002"}));
  const auto destroyed_at = Clock::now();
  leaving.reset();
  CHECK(Clock::now() - destroyed_at < 1s);
  CHECK(recorder.wait_for({"127.0.0.1:7001"}));
  // Gone by revoke: the lease had 60 s to run.
  CHECK(Clock::now() - destroyed_at < kLimit);
}

TEST_CASE("a worker that stops renewing its lease disappears when the lease ends") {
  // A worker that died after registering: its lease and key exist, and
  // nothing keeps the lease alive. Made with etcdctl, as that worker would
  // have left them.
  EtcdProcess& etcd = shared_etcd();
  const std::string prefix = "/fmwire-test/expired/";
  Recorder recorder;
  auto watcher = watch(etcd.url(), prefix, recorder);
  auto living = register_worker(etcd.url(), prefix, "127.0.0.1:7001", 60s);
  int status = 0;
  const std::string granted = etcd.ctl("lease grant 2", &status);
  REQUIRE_MESSAGE(status == 0, granted);
  std::istringstream words(granted);
  std::string word;
  std::string lease;
  words >> word >> lease;  // "lease 694d7d0b1c8f9a14 granted with TTL(2s)"
  REQUIRE_MESSAGE(word == "lease", granted);
  const std::string put = etcd.ctl("put --lease=" + lease + " " + prefix + "127.0.0.1:7002 127.0.0.1:7002", &status);
  REQUIRE_MESSAGE(status == 0, put);
  CHECK(recorder.wait_for({"127.0.0.1:7001", "127.0.0.1:7002"}));
  CHECK(recorder.wait_for({"127.0.0.1:7001"}));
  CHECK(recorder.errors().empty());
}

TEST_CASE("a watcher reports errors while etcd is down and the set again once it is back") {
  EtcdProcess etcd;
  const std::string prefix = "/workers/";
  Recorder recorder;
  auto watcher = watch(etcd.url(), prefix, recorder);
  auto first = register_worker(etcd.url(), prefix, "127.0.0.1:7001", 3s);
  REQUIRE(recorder.wait_for({"127.0.0.1:7001"}));

  const std::size_t sets_before_stop = recorder.sets().size();
  etcd.stop();
  CHECK(recorder.wait_for_error());
  const auto errors = recorder.errors();
  REQUIRE(!errors.empty());
  INFO("errors:\n", joined(errors));
  CHECK(errors.front().find("etcd at " + std::string("127.0.0.1:") + std::to_string(etcd.url().port)) !=
        std::string::npos);

  // Same port and data: the first worker's key and lease survive; the
  // watcher must be watching again to see the second.
  etcd.start();
  auto second = register_worker(etcd.url(), prefix, "127.0.0.1:7002", 3s);
  CHECK(recorder.wait_for({"127.0.0.1:7001", "127.0.0.1:7002"}));
  // No empty set was reported while etcd was down: the last known set stood.
  const auto sets = recorder.sets();
  for (std::size_t i = sets_before_stop; i < sets.size(); ++i) CHECK(!sets[i].empty());
}

TEST_CASE("a registration registers again when etcd comes back without its lease") {
  EtcdProcess etcd;
  const std::string prefix = "/workers/";
  auto worker = register_worker(etcd.url(), prefix, "127.0.0.1:7001", 2s);
  etcd.stop();
  etcd.wipe_data();
  etcd.start();
  // An etcd with no keys: the registration's keepalive finds its lease
  // unknown, and it takes a new one and puts its key again.
  Recorder recorder;
  auto watcher = watch(etcd.url(), prefix, recorder);
  CHECK(recorder.wait_for({"127.0.0.1:7001"}));
  CHECK(recorder.errors().empty());
}

TEST_CASE("destroying a watcher or a registration is prompt while etcd is down") {
  EtcdProcess etcd;
  const std::string prefix = "/workers/";
  Recorder recorder;
  auto watcher = watch(etcd.url(), prefix, recorder);
  auto worker = register_worker(etcd.url(), prefix, "127.0.0.1:7001", 3s);
  REQUIRE(recorder.wait_for({"127.0.0.1:7001"}));
  etcd.stop();
  REQUIRE(recorder.wait_for_error());
  auto destroyed_at = Clock::now();
  watcher.reset();
  CHECK(Clock::now() - destroyed_at < 1s);
  destroyed_at = Clock::now();
  worker.reset();  // its revoke finds no etcd
  CHECK(Clock::now() - destroyed_at < 1500ms);
}

// ---- etcd over TLS, with client certificates ----

TEST_CASE("over https with client certificates a worker registers and a watcher finds it") {
  TestCertificates certificates;
  EtcdProcess etcd(&certificates);
  const EtcdUrl url = etcd.url(certificates.client());
  Recorder recorder;
  auto watcher = watch(url, "/tls/workers/", recorder);
  CHECK(recorder.wait_for({}));
  auto registration = register_worker(url, "/tls/workers/", "127.0.0.1:7101");
  CHECK(recorder.wait_for({"127.0.0.1:7101"}));
  // etcdctl, with its own TLS stack, sees the same key.
  CHECK(etcd.ctl("get --prefix /tls/workers/ --keys-only").find("/tls/workers/127.0.0.1:7101") != std::string::npos);
  registration.reset();
  CHECK(recorder.wait_for({}));
  CHECK(recorder.errors().empty());
}

TEST_CASE("a client certificate from another CA is refused by etcd, and the error says TLS") {
  TestCertificates certificates;
  EtcdProcess etcd(&certificates);
  auto registration =
      EtcdRegistration::start(etcd.url(certificates.client("other-client")), "/tls/workers/", "127.0.0.1:7102", 30s);
  REQUIRE_FALSE(registration.has_value());
  MESSAGE(registration.error());
  CHECK(registration.error().find("etcd at 127.0.0.1:") == 0);
  CHECK(registration.error().find("TLS") != std::string::npos);
  // Nothing was written.
  CHECK(etcd.ctl("get --prefix /tls/workers/ --keys-only").find("7102") == std::string::npos);
}

TEST_CASE("an etcd whose certificate does not chain to the given CA is refused before any request") {
  TestCertificates certificates;
  EtcdProcess etcd(&certificates);
  Recorder recorder;
  auto watcher = EtcdWatcher::start(etcd.url(certificates.client("client", "other-ca")), "/tls/workers/",
                                    recorder.changed(), recorder.error());
  REQUIRE_FALSE(watcher.has_value());
  MESSAGE(watcher.error());
  CHECK(watcher.error().find("TLS handshake") != std::string::npos);
  CHECK(watcher.error().find("certificate verify failed") != std::string::npos);
}

TEST_CASE("an https URL against a plain-http etcd fails with a TLS error, not a hang") {
  EtcdProcess& etcd = shared_etcd();
  TestCertificates certificates;
  auto url = parse_etcd_url("https://127.0.0.1:" + std::to_string(etcd.url().port), certificates.client());
  REQUIRE(url.has_value());
  auto registration = EtcdRegistration::start(*url, "/tls/plain/", "127.0.0.1:7103", 30s);
  REQUIRE_FALSE(registration.has_value());
  MESSAGE(registration.error());
  CHECK(registration.error().find("TLS") != std::string::npos);
}

}  // namespace
}  // namespace fmwire::discovery
