// One log for every fmwire process: spdlog underneath, a line per event on
// standard error, as text for people or as JSON for log collectors.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>

namespace fmwire::log {

enum class Level { debug, info, warn, error, off };
enum class Format { text, json };

struct Settings {
  Level level = Level::info;
  Format format = Format::text;
  // Leads every text line ("fmwire router: ...") and is "process" in JSON.
  std::string process = "fmwire";
};

// "debug", "info", "warn", "error", "off" (and "warning"); nullopt otherwise.
std::optional<Level> parse_level(std::string_view name);
// "text" or "json"; nullopt otherwise.
std::optional<Format> parse_format(std::string_view name);

// Sets the process's log: from then on every line, on any thread, follows
// `settings`. Before it, lines are text at info from process "fmwire".
void configure(const Settings& settings);
const Settings& settings();

// One key and its value in a line: `key=value` in text, a member in JSON.
// Holds a view of a string value, which must outlive the log call (a
// temporary in the call's own expression does).
class Field {
 public:
  Field(std::string_view key, std::string_view value) : key_(key), value_(value) {}
  Field(std::string_view key, const std::string& value) : key_(key), value_(std::string_view(value)) {}
  Field(std::string_view key, const char* value) : key_(key), value_(std::string_view(value)) {}
  Field(std::string_view key, bool value) : key_(key), value_(value) {}
  Field(std::string_view key, double value) : key_(key), value_(value) {}
  template <typename Integer>
    requires(std::is_integral_v<Integer> && !std::is_same_v<Integer, bool>)
  Field(std::string_view key, Integer value) : key_(key) {
    if constexpr (std::is_signed_v<Integer>) {
      value_ = static_cast<std::int64_t>(value);
    } else {
      value_ = static_cast<std::uint64_t>(value);
    }
  }

  std::string_view key() const { return key_; }
  // The value as text ("true", "12", "1.5", or the string itself).
  std::string text() const;
  // The value as JSON (a quoted, escaped string; a number; true or false).
  std::string json() const;
  bool is_string() const { return std::holds_alternative<std::string_view>(value_); }

 private:
  std::string_view key_;
  std::variant<std::string_view, std::int64_t, std::uint64_t, double, bool> value_;
};

using Fields = std::initializer_list<Field>;

// Whether a line at `level` would be written (to skip building costly ones).
bool enabled(Level level);

// Writes one line. `message` says what happened in plain words; `fields`
// name what it concerns (stream, transfer, worker, endpoint, ...).
void write(Level level, std::string_view message, Fields fields = {});

inline void debug(std::string_view message, Fields fields = {}) { write(Level::debug, message, fields); }
inline void info(std::string_view message, Fields fields = {}) { write(Level::info, message, fields); }
inline void warn(std::string_view message, Fields fields = {}) { write(Level::warn, message, fields); }
inline void error(std::string_view message, Fields fields = {}) { write(Level::error, message, fields); }

// The line `write` would hand to the sink after the time and level: for
// tests of the text and JSON forms.
std::string format_line(Format format, std::string_view message, Fields fields);

}  // namespace fmwire::log
