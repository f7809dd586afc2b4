// metrics/: the Prometheus text writer and the /metrics server.
#include <doctest/doctest.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <limits>
#include <string>
#include <thread>

#include "metrics/metrics_server.h"
#include "metrics/prometheus_text.h"

namespace {

using fmwire::metrics::Histogram;
using fmwire::metrics::MetricsServer;
using fmwire::metrics::PrometheusText;
namespace http = boost::beast::http;

// One request on a fresh connection: the response's status and body.
http::response<http::string_body> request(std::uint16_t port, http::verb method, const std::string& target) {
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket socket(io);
  socket.connect({boost::asio::ip::make_address("127.0.0.1"), port});
  http::request<http::empty_body> out(method, target, 11);
  out.set(http::field::host, "127.0.0.1");
  http::write(socket, out);
  boost::beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.skip(method == http::verb::head);
  http::read(socket, buffer, parser);
  return parser.release();
}

std::unique_ptr<MetricsServer> start(MetricsServer::Render render) {
  auto started = MetricsServer::start("127.0.0.1", 0, std::move(render));
  REQUIRE(std::holds_alternative<std::unique_ptr<MetricsServer>>(started));
  return std::move(std::get<std::unique_ptr<MetricsServer>>(started));
}

}  // namespace

TEST_CASE("prometheus text: label values are escaped and numbers spelled as the format reads them") {
  PrometheusText page;
  page.family("x_total", "counter", "Help.").sample("x_total", {{"a", "q\"b\\c\nd"}}, std::uint64_t{7});
  CHECK(page.text() == "# HELP x_total Help.\n# TYPE x_total counter\nx_total{a=\"q\\\"b\\\\c\\nd\"} 7\n");
  CHECK(PrometheusText::number(0.25) == "0.25");
  CHECK(PrometheusText::number(std::numeric_limits<double>::infinity()) == "+Inf");
}

TEST_CASE("a histogram renders cumulative buckets, its sum and its count") {
  static constexpr double kBounds[] = {0.1, 1.0};
  Histogram histogram(kBounds);
  histogram.observe(0.05);
  histogram.observe(0.1);  // on a bound: in that bucket (le)
  histogram.observe(0.5);
  histogram.observe(3.0);
  PrometheusText page;
  histogram.render(page, "h_seconds", "H.");
  CHECK(page.text() ==
        "# HELP h_seconds H.\n# TYPE h_seconds histogram\n"
        "h_seconds_bucket{le=\"0.1\"} 2\nh_seconds_bucket{le=\"1\"} 3\nh_seconds_bucket{le=\"+Inf\"} 4\n"
        "h_seconds_sum 3.65\nh_seconds_count 4\n");
  CHECK(histogram.count() == 4);
}

TEST_CASE("the metrics server renders /metrics on its own thread, not the caller's") {
  std::thread::id rendered_on;
  auto server = start([&]() -> std::optional<std::string> {
    rendered_on = std::this_thread::get_id();
    return std::string("up 1\n");
  });
  const auto response = request(server->port(), http::verb::get, "/metrics");
  CHECK(response.result_int() == 200);
  CHECK(response.body() == "up 1\n");
  CHECK(response[http::field::content_type] == "text/plain; version=0.0.4; charset=utf-8");
  CHECK(rendered_on != std::thread::id{});
  CHECK(rendered_on != std::this_thread::get_id());
  CHECK(server->url() == "http://127.0.0.1:" + std::to_string(server->port()) + "/metrics");
}

TEST_CASE("the metrics server answers 503 when the numbers cannot be had, 404 and 405 for other requests") {
  auto server = start([]() -> std::optional<std::string> { return std::nullopt; });
  CHECK(request(server->port(), http::verb::get, "/metrics").result_int() == 503);
  CHECK(request(server->port(), http::verb::get, "/other").result_int() == 404);
  CHECK(request(server->port(), http::verb::post, "/metrics").result_int() == 405);
  const auto health = request(server->port(), http::verb::get, "/health");
  CHECK(health.result_int() == 200);
  CHECK(health.body() == "ok\n");
}

TEST_CASE("the metrics server refuses an address it cannot use, saying which") {
  auto bad = MetricsServer::start("not-an-address", 0, [] { return std::optional<std::string>(""); });
  REQUIRE(std::holds_alternative<std::string>(bad));
  CHECK(std::get<std::string>(bad).find("not-an-address") != std::string::npos);
  auto first = start([] { return std::optional<std::string>(""); });
  auto taken = MetricsServer::start("127.0.0.1", first->port(), [] { return std::optional<std::string>(""); });
  REQUIRE(std::holds_alternative<std::string>(taken));
  CHECK(std::get<std::string>(taken).find("cannot listen") != std::string::npos);
}
