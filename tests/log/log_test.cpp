// The log's two forms: text a person reads and a splitter on spaces takes
// apart, JSON a collector parses; neither can be broken by what a peer sent.
#include <doctest/doctest.h>

#include <boost/json.hpp>

#include "log/log.h"

namespace fmwire::log {
namespace {

TEST_CASE("text lines put fields after the message as key=value, quoting what has spaces") {
  const std::string line = format_line(Format::text, "worker joined",
                                       {{"worker", "10.214.0.3:7101"}, {"role", "decode"}, {"slots", 8u},
                                        {"reason", "connection refused"}, {"empty", ""}});
  CHECK(line == "worker joined worker=10.214.0.3:7101 role=decode slots=8 reason=\"connection refused\" empty=\"\"");
}

TEST_CASE("a newline a peer sent cannot start a forged text line") {
  const std::string line = format_line(Format::text, "refused: bad\nfmwire router: forged", {{"why", "a\nb"}});
  CHECK(line.find('\n') == std::string::npos);
  CHECK(line == "refused: bad\\nfmwire router: forged why=\"a\\nb\"");
}

TEST_CASE("JSON lines are members a collector parses, numbers as numbers") {
  const std::string members = format_line(Format::json, "stream failed \"x\"",
                                          {{"stream", std::uint32_t{7}}, {"transfer", std::uint64_t{1} << 63},
                                           {"delta", -3}, {"ratio", 0.5}, {"migrated", true}, {"peer", "a\tb"}});
  const boost::json::object object = boost::json::parse("{" + members + "}").as_object();
  CHECK(object.at("msg").as_string() == "stream failed \"x\"");
  CHECK(object.at("stream").as_int64() == 7);
  CHECK(object.at("transfer").as_uint64() == (std::uint64_t{1} << 63));
  CHECK(object.at("delta").as_int64() == -3);
  CHECK(object.at("ratio").as_double() == 0.5);
  CHECK(object.at("migrated").as_bool());
  CHECK(object.at("peer").as_string() == "a\tb");
}

TEST_CASE("invalid UTF-8 and control bytes become escapes, so the JSON stays valid") {
  const std::string bad("\xff\xc0\x80ok\x01\xed\xa0\x80", 9);
  const std::string members = format_line(Format::json, bad, {{"name", std::string_view("caf\xc3\xa9", 5)}});
  boost::system::error_code error;
  const boost::json::value value = boost::json::parse("{" + members + "}", error);
  REQUIRE_FALSE(error);
  CHECK(value.at("msg").as_string() == "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbdok\x01\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
  CHECK(value.at("name").as_string() == "caf\xc3\xa9");
}

TEST_CASE("NaN has no JSON form: it is written as null") {
  const std::string members = format_line(Format::json, "m", {{"x", std::numeric_limits<double>::quiet_NaN()}});
  CHECK(members == "\"msg\":\"m\",\"x\":null");
}

TEST_CASE("levels and formats parse from their flag names and nothing else") {
  CHECK(parse_level("debug") == Level::debug);
  CHECK(parse_level("warning") == Level::warn);
  CHECK(parse_level("off") == Level::off);
  CHECK_FALSE(parse_level("verbose"));
  CHECK(parse_format("json") == Format::json);
  CHECK_FALSE(parse_format("JSON "));
}

TEST_CASE("the level set is the one lines are checked against") {
  const Settings before = settings();
  configure({Level::warn, Format::text, "fmwire test"});
  CHECK_FALSE(enabled(Level::info));
  CHECK(enabled(Level::warn));
  CHECK(enabled(Level::error));
  configure({Level::off, Format::json, "fmwire test"});
  CHECK_FALSE(enabled(Level::error));
  configure(before);
}

}  // namespace
}  // namespace fmwire::log
