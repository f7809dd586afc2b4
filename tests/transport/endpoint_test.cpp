// HOST:PORT as flags and etcd entries give it (transport/endpoint.h): names,
// IPv4, and IPv6 in brackets, with errors that say what is wrong.
#include <doctest/doctest.h>

#include <string>

#include "transport/endpoint.h"

namespace fmwire::transport {
namespace {

Endpoint parsed(const std::string& text) {
  std::string error;
  auto endpoint = parse_endpoint(text, &error);
  REQUIRE_MESSAGE(endpoint.has_value(), text, ": ", error);
  return *endpoint;
}

// The error for text that must not parse.
std::string refusal(const std::string& text) {
  std::string error;
  auto endpoint = parse_endpoint(text, &error);
  const std::string parsed_as = endpoint ? endpoint->to_string() : std::string();
  REQUIRE_MESSAGE(!endpoint.has_value(), text, " parsed as ", parsed_as);
  CHECK_MESSAGE(error.find("'" + text + "'") != std::string::npos, error);
  return error;
}

bool says(const std::string& error, const std::string& words) {
  const bool found = error.find(words) != std::string::npos;
  if (!found) MESSAGE(error);
  return found;
}

TEST_CASE("an IPv6 address in brackets parses, and prints back in brackets") {
  const Endpoint endpoint = parsed("[::1]:7000");
  CHECK(endpoint.host == "::1");
  CHECK(endpoint.port == 7000);
  CHECK(endpoint.numeric());
  CHECK(endpoint.to_string() == "[::1]:7000");
  CHECK(parsed("[fd00:1:2::17]:65535").to_string() == "[fd00:1:2::17]:65535");
}

TEST_CASE("a host name parses as the name, not resolved") {
  const Endpoint endpoint = parsed("host:7000");
  CHECK(endpoint.host == "host");
  CHECK(endpoint.port == 7000);
  CHECK_FALSE(endpoint.numeric());
  CHECK(endpoint.to_string() == "host:7000");
  CHECK(parsed("localhost:0").host == "localhost");
  CHECK(parsed("worker-3.pod.cluster.local:7100").host == "worker-3.pod.cluster.local");
  CHECK(parsed("etcd_1:2379").host == "etcd_1");
  CHECK(parsed("fqdn.example.:80").host == "fqdn.example.");
}

TEST_CASE("an IPv4 address parses, port 0 included") {
  const Endpoint endpoint = parsed("1.2.3.4:0");
  CHECK(endpoint.host == "1.2.3.4");
  CHECK(endpoint.port == 0);
  CHECK(endpoint.numeric());
  CHECK(endpoint.to_string() == "1.2.3.4:0");
}

TEST_CASE("every address an endpoint prints parses back to the same endpoint") {
  for (const char* text : {"127.0.0.1:7000", "[::1]:1", "[::]:0", "0.0.0.0:65535", "localhost:7100", "a.b-c.d:9"}) {
    const Endpoint endpoint = parsed(text);
    CHECK(endpoint.to_string() == text);
    const Endpoint again = parsed(endpoint.to_string());
    CHECK(again.host == endpoint.host);
    CHECK(again.port == endpoint.port);
  }
}

TEST_CASE("0.0.0.0 and [::] are unspecified; loopback and names are not") {
  CHECK(parsed("0.0.0.0:7000").unspecified());
  CHECK(parsed("[::]:7000").unspecified());
  CHECK(parsed("[0:0::0]:7000").unspecified());
  CHECK_FALSE(parsed("127.0.0.1:7000").unspecified());
  CHECK_FALSE(parsed("[::1]:7000").unspecified());
  CHECK_FALSE(parsed("localhost:7000").unspecified());
}

TEST_CASE("an IPv6 address without brackets is refused, with the form to use") {
  CHECK(says(refusal("::1:7000"), "[::1]:7000"));
  CHECK(says(refusal("fe80::1:80"), "brackets"));
}

TEST_CASE("an empty host is refused, naming the addresses that mean every interface") {
  CHECK(says(refusal(":7000"), "the host is empty"));
  CHECK(says(refusal("[]:7000"), "the host is empty"));
}

TEST_CASE("a port that is missing, not a number or over 65535 is refused") {
  CHECK(says(refusal("[::1]"), "[IPv6]:PORT"));
  CHECK(says(refusal("[::1]7000"), "[IPv6]:PORT"));
  CHECK(says(refusal("host"), "expected HOST:PORT"));
  CHECK(says(refusal("host:"), "expected a port"));
  CHECK(says(refusal("[::1]:"), "expected a port"));
  CHECK(says(refusal("host:65536"), "from 0 to 65535"));
  CHECK(says(refusal("host:-1"), "from 0 to 65535"));
  CHECK(says(refusal("host:http"), "from 0 to 65535"));
  CHECK(says(refusal("host:70 "), "from 0 to 65535"));
  CHECK(says(refusal("1.2.3.4:99999999999"), "from 0 to 65535"));
}

TEST_CASE("brackets around something that is not IPv6 are refused") {
  CHECK(says(refusal("[1.2.3.4]:80"), "not an IPv6 address"));
  CHECK(says(refusal("[localhost]:80"), "not an IPv6 address"));
  CHECK(says(refusal("[::1:80"), "[IPv6]:PORT"));
}

TEST_CASE("dotted numbers that are not an IPv4 address are refused, not looked up") {
  CHECK(says(refusal("1.2.3.256:80"), "not an IPv4 address"));
  CHECK(says(refusal("1.2.3:80"), "not an IPv4 address"));
  CHECK(says(refusal("10:80"), "not an IPv4 address"));
}

TEST_CASE("a host name with characters or labels DNS cannot have is refused") {
  CHECK(says(refusal("bad host:80"), "character"));
  CHECK(says(refusal("user@host:80"), "character"));
  CHECK(says(refusal("a/b:80"), "character"));
  CHECK(says(refusal("a..b:80"), "empty label"));
  CHECK(says(refusal(".a:80"), "empty label"));
  CHECK(says(refusal("-a.b:80"), "starts or ends with '-'"));
  CHECK(says(refusal(std::string(64, 'a') + ":80"), "over 63"));
  std::string long_name;
  for (int i = 0; i < 64; ++i) long_name += "abc.";
  CHECK(says(refusal(long_name + "x:80"), "at most 253"));
}

}  // namespace
}  // namespace fmwire::transport
