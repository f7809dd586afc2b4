#include "transport/host_resolver.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>

namespace fmwire::transport {
namespace {

void set_port(SocketAddress& address, std::uint16_t port) {
  if (address.family() == AF_INET) {
    reinterpret_cast<sockaddr_in*>(&address.storage)->sin_port = htons(port);
  } else if (address.family() == AF_INET6) {
    reinterpret_cast<sockaddr_in6*>(&address.storage)->sin6_port = htons(port);
  }
}

SocketAddresses with_port(SocketAddresses addresses, std::uint16_t port) {
  for (SocketAddress& address : addresses) set_port(address, port);
  return addresses;
}

bool same_address(const SocketAddress& a, const SocketAddress& b) {
  return a.bytes == b.bytes && std::memcmp(&a.storage, &b.storage, a.bytes) == 0;
}

class LookupCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "name lookup"; }
  std::string message(int code) const override {
    switch (code) {
      case static_cast<int>(LookupErrc::timed_out):
        return "name lookup timed out";
      case static_cast<int>(LookupErrc::no_addresses):
        return "host name has no IPv4 or IPv6 address";
      case EAI_NONAME:
        return "host name not found";
#ifdef EAI_NODATA
      case EAI_NODATA:
        return "host name has no address";
#endif
      case EAI_AGAIN:
        return "name lookup failed for now (no answer from DNS)";
      case EAI_FAIL:
        return "name lookup failed (DNS refused)";
      default:
        return ::gai_strerror(code);
    }
  }
};

}  // namespace

std::string SocketAddress::to_string() const {
  char text[INET6_ADDRSTRLEN] = {};
  if (family() == AF_INET) {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(&storage);
    ::inet_ntop(AF_INET, &v4->sin_addr, text, sizeof text);
    std::string result = text;
    result.append(":").append(std::to_string(ntohs(v4->sin_port)));
    return result;
  }
  if (family() == AF_INET6) {
    const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&storage);
    ::inet_ntop(AF_INET6, &v6->sin6_addr, text, sizeof text);
    // Appended piece by piece: GCC 12's -Wrestrict misfires on "[" + std::string.
    std::string result = "[";
    result.append(text).append("]:").append(std::to_string(ntohs(v6->sin6_port)));
    return result;
  }
  return "(address family " + std::to_string(family()) + ")";
}

std::string SocketAddress::host() const {
  char text[INET6_ADDRSTRLEN] = {};
  if (family() == AF_INET) {
    ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&storage)->sin_addr, text, sizeof text);
  } else if (family() == AF_INET6) {
    ::inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_addr, text, sizeof text);
  }
  return text;
}

std::optional<SocketAddress> numeric_address(const std::string& host, std::uint16_t port) {
  SocketAddress address;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&address.storage);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&address.storage);
  if (::inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    address.bytes = sizeof(sockaddr_in);
  } else if (::inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    address.bytes = sizeof(sockaddr_in6);
  } else {
    return std::nullopt;
  }
  set_port(address, port);
  return address;
}

const std::error_category& lookup_category() {
  static const LookupCategory category;
  return category;
}

std::error_code make_error_code(LookupErrc code) { return {static_cast<int>(code), lookup_category()}; }

std::error_code lookup_error(int eai_code) { return {eai_code, lookup_category()}; }

std::error_code system_lookup(const std::string& host, SocketAddresses& addresses) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_protocol = IPPROTO_TCP;
  // No AI_ADDRCONFIG: on a host with only loopback configured it hides
  // localhost's addresses, and tests run on exactly such hosts.
  addrinfo* found = nullptr;
  const int result = ::getaddrinfo(host.c_str(), nullptr, &hints, &found);
  if (result == EAI_SYSTEM) return {errno, std::system_category()};
  if (result != 0) return lookup_error(result);
  for (const addrinfo* entry = found; entry != nullptr; entry = entry->ai_next) {
    if ((entry->ai_family != AF_INET && entry->ai_family != AF_INET6) || entry->ai_addrlen > sizeof(sockaddr_storage)) {
      continue;
    }
    SocketAddress address;
    std::memcpy(&address.storage, entry->ai_addr, entry->ai_addrlen);
    address.bytes = entry->ai_addrlen;
    const bool seen = std::any_of(addresses.begin(), addresses.end(),
                                  [&](const SocketAddress& other) { return same_address(other, address); });
    if (!seen) addresses.push_back(address);
  }
  ::freeaddrinfo(found);
  if (addresses.empty()) return LookupErrc::no_addresses;
  return {};
}

std::error_code resolve_blocking(const std::string& host, std::uint16_t port, std::chrono::milliseconds timeout,
                                 SocketAddresses& addresses, const LookupFunction& lookup) {
  if (auto address = numeric_address(host, port)) {
    addresses = {*address};
    return {};
  }
  // Shared with the helper thread, which may outlive this call.
  struct Answer {
    std::mutex mutex;
    std::condition_variable ready;
    bool done = false;
    SocketAddresses addresses;
    std::error_code error;
  };
  auto answer = std::make_shared<Answer>();
  std::thread helper([answer, host, lookup] {
    SocketAddresses found;
    const std::error_code error = lookup(host, found);
    std::lock_guard lock(answer->mutex);
    answer->addresses = std::move(found);
    answer->error = error;
    answer->done = true;
    answer->ready.notify_one();
  });
  std::unique_lock lock(answer->mutex);
  if (!answer->ready.wait_for(lock, timeout, [&] { return answer->done; })) {
    lock.unlock();
    helper.detach();  // getaddrinfo cannot be interrupted: its answer goes nowhere
    return LookupErrc::timed_out;
  }
  lock.unlock();
  helper.join();
  if (answer->error) return answer->error;
  if (answer->addresses.empty()) return LookupErrc::no_addresses;
  addresses = with_port(std::move(answer->addresses), port);
  return {};
}

Endpoint numeric_endpoint(const Endpoint& endpoint) {
  if (endpoint.numeric()) return endpoint;
  SocketAddresses addresses;
  if (const std::error_code error = resolve_blocking(endpoint.host, endpoint.port, kLookupTimeout, addresses)) {
    throw std::system_error(error, "looking up " + endpoint.host);
  }
  return Endpoint{addresses.front().host(), endpoint.port};
}

// ------------------------------------------------------------ HostResolver

// What a helper thread shares with the loop: the backend to post its answer
// to, null once the resolver has gone. The thread itself is the loop's to
// join (when the answer arrives) or detach (when the resolver goes first).
struct HostResolver::Mailbox {
  std::mutex mutex;
  IoBackend* backend = nullptr;
  std::thread thread;  // touched on the loop thread only
};

HostResolver::HostResolver(IoBackend& backend, std::chrono::milliseconds timeout, LookupFunction lookup)
    : backend_(backend), timeout_(timeout), lookup_(std::move(lookup)) {}

HostResolver::~HostResolver() {
  for (auto& [host, lookup] : lookups_) {
    {
      std::lock_guard lock(lookup.mailbox->mutex);
      lookup.mailbox->backend = nullptr;
    }
    lookup.mailbox->thread.detach();
    for (auto& [request, waiter] : lookup.waiters) backend_.cancel(waiter.timer);
  }
}

void HostResolver::resolve(const std::string& host, std::uint16_t port, Done done) {
  if (auto address = numeric_address(host, port)) {
    backend_.post([done = std::move(done), address = *address]() mutable { done({address}, {}); });
    return;
  }
  const std::uint64_t request = next_request_++;
  auto [found, fresh] = lookups_.try_emplace(host);
  Lookup& lookup = found->second;
  Waiter& waiter = lookup.waiters[request];
  waiter.port = port;
  waiter.done = std::move(done);
  waiter.timer = backend_.schedule(timeout_, [this, host, request] { time_out(host, request); });
  if (!fresh) return;  // that name is being looked up already: wait for its answer

  auto mailbox = std::make_shared<Mailbox>();
  mailbox->backend = &backend_;
  lookup.mailbox = mailbox;
  try {
    mailbox->thread = start_lookup(mailbox, host);
  } catch (const std::system_error& error) {  // no thread to be had (EAGAIN): this request fails, later ones retry
    backend_.cancel(waiter.timer);
    backend_.post([done = std::move(waiter.done), code = error.code()] { done({}, code); });
    lookups_.erase(found);
  }
}

std::thread HostResolver::start_lookup(std::shared_ptr<Mailbox> mailbox, const std::string& host) {
  return std::thread([this, mailbox, host, lookup_function = lookup_] {
    SocketAddresses addresses;
    const std::error_code error = lookup_function(host, addresses);
    std::lock_guard lock(mailbox->mutex);
    if (mailbox->backend == nullptr) return;  // the resolver has gone
    // `this` is alive while the mailbox has a backend: the destructor
    // clears it under this lock before anything else.
    mailbox->backend->post([this, mailbox, host, addresses = std::move(addresses), error]() mutable {
      {
        std::lock_guard lock(mailbox->mutex);
        if (mailbox->backend == nullptr) return;
      }
      finish(host, std::move(addresses), error);
    });
  });
}

void HostResolver::finish(const std::string& host, SocketAddresses addresses, std::error_code error) {
  auto found = lookups_.find(host);
  if (found == lookups_.end()) return;
  Lookup lookup = std::move(found->second);
  lookups_.erase(found);
  // The thread posted this and is returning: joining waits a moment at most.
  if (lookup.mailbox->thread.joinable()) lookup.mailbox->thread.join();
  if (!error && addresses.empty()) error = LookupErrc::no_addresses;
  for (auto& [request, waiter] : lookup.waiters) {
    backend_.cancel(waiter.timer);
    if (error) {
      waiter.done({}, error);
    } else {
      waiter.done(with_port(addresses, waiter.port), {});
    }
  }
}

void HostResolver::time_out(const std::string& host, std::uint64_t request) {
  auto found = lookups_.find(host);
  if (found == lookups_.end()) return;
  auto waiter = found->second.waiters.find(request);
  if (waiter == found->second.waiters.end()) return;
  Done done = std::move(waiter->second.done);
  found->second.waiters.erase(waiter);
  // The lookup itself carries on: later requests for the name wait for it.
  done({}, LookupErrc::timed_out);
}

}  // namespace fmwire::transport
