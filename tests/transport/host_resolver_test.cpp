// Names looked up off the loop (transport/host_resolver.h): answers come on
// the loop, a name that does not resolve is an error within the bound, and
// a stalled lookup neither blocks the loop nor outlives its deadline. Run
// on both backends. Only loopback names: localhost, and names under
// .invalid, which never resolve (RFC 6761).
#include <arpa/inet.h>
#include <netinet/in.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "transport/asio_backend.h"
#include "transport/host_resolver.h"
#include "transport/uring_backend.h"
#include "loopback.h"

namespace fmwire::transport {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

struct Answer {
  bool called = false;
  SocketAddresses addresses;
  std::error_code error;
  Clock::duration after{};
};

// Resolves host:port on `backend` with `resolver`, running the loop until
// the answer comes.
Answer resolve(IoBackend& backend, HostResolver& resolver, const std::string& host, std::uint16_t port) {
  Answer answer;
  const Clock::time_point start = Clock::now();
  bool inside = true;
  resolver.resolve(host, port, [&](SocketAddresses addresses, std::error_code error) {
    CHECK_FALSE(inside);  // never from inside resolve()
    answer.called = true;
    answer.addresses = std::move(addresses);
    answer.error = error;
    answer.after = Clock::now() - start;
    backend.stop();
  });
  inside = false;
  REQUIRE(test::run_until_stopped(backend, 10s));
  REQUIRE(answer.called);
  return answer;
}

// A lookup that waits until released (or 5 s), counting its calls. Shared
// with the lookup threads, which may outlive a test's resolver.
struct StallingLookup {
  std::mutex mutex;
  std::condition_variable released_changed;
  bool released = false;
  std::atomic<int> calls{0};

  void release() {
    std::lock_guard lock(mutex);
    released = true;
    released_changed.notify_all();
  }
};

LookupFunction stalling_lookup(std::shared_ptr<StallingLookup> state) {
  return [state](const std::string&, SocketAddresses& addresses) {
    ++state->calls;
    std::unique_lock lock(state->mutex);
    state->released_changed.wait_for(lock, 5s, [&] { return state->released; });
    addresses.push_back(*numeric_address("127.0.0.1", 0));
    return std::error_code();
  };
}

TEST_CASE("a numeric host resolves to itself, from the loop, with no lookup") {
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      auto backend = kind.make();
      std::atomic<int> lookups{0};
      HostResolver resolver(*backend, 1s, [&](const std::string&, SocketAddresses&) {
        ++lookups;
        return std::error_code();
      });
      const Answer v4 = resolve(*backend, resolver, "127.0.0.1", 7000);
      REQUIRE_FALSE(v4.error);
      REQUIRE(v4.addresses.size() == 1);
      CHECK(v4.addresses[0].to_string() == "127.0.0.1:7000");
      const Answer v6 = resolve(*backend, resolver, "::1", 7001);
      REQUIRE_FALSE(v6.error);
      REQUIRE(v6.addresses.size() == 1);
      CHECK(v6.addresses[0].to_string() == "[::1]:7001");
      CHECK(lookups == 0);
      CHECK(resolver.lookups_in_flight() == 0);
    }
  }
}

TEST_CASE("localhost resolves to a loopback address, the port set") {
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      auto backend = kind.make();
      HostResolver resolver(*backend);
      const Answer answer = resolve(*backend, resolver, "localhost", 7100);
      REQUIRE_MESSAGE(!answer.error, answer.error.message());
      REQUIRE_FALSE(answer.addresses.empty());
      for (const SocketAddress& address : answer.addresses) {
        const std::string text = address.to_string();
        CHECK_MESSAGE((text == "127.0.0.1:7100" || text == "[::1]:7100"), text);
      }
      CHECK(resolver.lookups_in_flight() == 0);  // its thread joined
    }
  }
}

TEST_CASE("a name under .invalid is an error within the bound, saying the name was not found or timed out") {
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      auto backend = kind.make();
      constexpr auto kBound = 3s;
      HostResolver resolver(*backend, kBound);
      const Answer answer = resolve(*backend, resolver, "no-such-host.invalid", 80);
      CHECK(answer.error);
      CHECK(answer.addresses.empty());
      CHECK(answer.after < kBound + 1s);
      CHECK(answer.error.category() == lookup_category());
    }
  }
}

TEST_CASE("a stalled lookup is a timed_out error at the bound, and the loop runs on meanwhile") {
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      auto backend = kind.make();
      auto stalling = std::make_shared<StallingLookup>();
      HostResolver resolver(*backend, 200ms, stalling_lookup(stalling));
      bool timer_fired = false;
      backend->schedule(20ms, [&] { timer_fired = true; });
      const Answer answer = resolve(*backend, resolver, "stalls.invalid", 80);
      CHECK(answer.error == LookupErrc::timed_out);
      CHECK(answer.error.message() == "name lookup timed out");
      CHECK(answer.after >= 200ms);
      CHECK(answer.after < 2s);
      CHECK(timer_fired);  // the loop was not blocked by the lookup
      stalling->release();
    }
  }
}

TEST_CASE("requests for a name already being looked up share its one lookup") {
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      auto backend = kind.make();
      auto stalling = std::make_shared<StallingLookup>();
      HostResolver resolver(*backend, 5s, stalling_lookup(stalling));
      std::vector<std::string> answers;
      for (std::uint16_t port : {7000, 7001, 7002}) {
        resolver.resolve("shared.invalid", port, [&](SocketAddresses addresses, std::error_code error) {
          REQUIRE_FALSE(error);
          answers.push_back(addresses.at(0).to_string());
          if (answers.size() == 3) backend->stop();
        });
      }
      CHECK(resolver.lookups_in_flight() == 1);
      backend->schedule(50ms, [&] { stalling->release(); });
      REQUIRE(test::run_until_stopped(*backend, 10s));
      CHECK(stalling->calls == 1);
      CHECK(answers == std::vector<std::string>{"127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"});
      CHECK(resolver.lookups_in_flight() == 0);
    }
  }
}

TEST_CASE("a name is looked up again on every request once the last lookup has answered") {
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      auto backend = kind.make();
      std::atomic<int> lookups{0};
      HostResolver resolver(*backend, 1s, [&](const std::string&, SocketAddresses& addresses) {
        ++lookups;
        addresses.push_back(*numeric_address("127.0.0.1", 0));
        return std::error_code();
      });
      for (int i = 0; i < 3; ++i) REQUIRE_FALSE(resolve(*backend, resolver, "again.invalid", 80).error);
      CHECK(lookups == 3);
    }
  }
}

TEST_CASE("destroying a resolver with a lookup in flight neither waits for it nor calls back") {
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      auto backend = kind.make();
      auto stalling = std::make_shared<StallingLookup>();
      bool called = false;
      {
        HostResolver resolver(*backend, 5s, stalling_lookup(stalling));
        resolver.resolve("abandoned.invalid", 80, [&](SocketAddresses, std::error_code) { called = true; });
        const Clock::time_point start = Clock::now();
        backend->schedule(50ms, [&] { backend->stop(); });
        REQUIRE(test::run_until_stopped(*backend, 10s));
        CHECK(Clock::now() - start < 2s);
      }
      const Clock::time_point destroyed = Clock::now();
      stalling->release();  // the orphaned thread finishes; its answer goes nowhere
      backend->schedule(100ms, [&] { backend->stop(); });
      REQUIRE(test::run_until_stopped(*backend, 10s));
      CHECK_FALSE(called);
      CHECK(Clock::now() - destroyed < 2s);
    }
  }
}

TEST_CASE("resolve_blocking gives up on a stalled lookup at its timeout") {
  auto stalling = std::make_shared<StallingLookup>();
  SocketAddresses addresses;
  const Clock::time_point start = Clock::now();
  const std::error_code error = resolve_blocking("stalls.invalid", 80, 100ms, addresses, stalling_lookup(stalling));
  CHECK(error == LookupErrc::timed_out);
  CHECK(Clock::now() - start < 2s);
  CHECK(addresses.empty());
  stalling->release();
}

TEST_CASE("resolve_blocking answers numeric hosts and localhost, and fails a .invalid name") {
  SocketAddresses addresses;
  REQUIRE_FALSE(resolve_blocking("::1", 9, 1s, addresses));
  CHECK(addresses.at(0).to_string() == "[::1]:9");
  addresses.clear();
  REQUIRE_FALSE(resolve_blocking("localhost", 9, 3s, addresses));
  REQUIRE_FALSE(addresses.empty());
  addresses.clear();
  const Clock::time_point start = Clock::now();
  const std::error_code error = resolve_blocking("no-such-host.invalid", 9, 3s, addresses);
  CHECK(error);
  CHECK(Clock::now() - start < 4s);
}

}  // namespace
}  // namespace fmwire::transport
