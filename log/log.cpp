#include "log/log.h"

#include <spdlog/logger.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <charconv>
#include <memory>
#include <mutex>

namespace fmwire::log {

namespace {

spdlog::level::level_enum to_spdlog(Level level) {
  switch (level) {
    case Level::debug: return spdlog::level::debug;
    case Level::info: return spdlog::level::info;
    case Level::warn: return spdlog::level::warn;
    case Level::error: return spdlog::level::err;
    case Level::off: return spdlog::level::off;
  }
  return spdlog::level::info;
}

// The length of the valid UTF-8 sequence at `text[at]`, 0 if it is not one.
std::size_t utf8_length(std::string_view text, std::size_t at) {
  const auto byte = [&](std::size_t index) { return static_cast<unsigned char>(text[index]); };
  const unsigned char lead = byte(at);
  std::size_t length = 0;
  unsigned min_next = 0x80, max_next = 0xbf;
  if (lead < 0x80) return 1;
  if (lead >= 0xc2 && lead <= 0xdf) {
    length = 2;
  } else if (lead >= 0xe0 && lead <= 0xef) {
    length = 3;
    if (lead == 0xe0) min_next = 0xa0;  // overlong
    if (lead == 0xed) max_next = 0x9f;  // surrogates
  } else if (lead >= 0xf0 && lead <= 0xf4) {
    length = 4;
    if (lead == 0xf0) min_next = 0x90;
    if (lead == 0xf4) max_next = 0x8f;
  } else {
    return 0;
  }
  if (at + length > text.size()) return 0;
  if (byte(at + 1) < min_next || byte(at + 1) > max_next) return 0;
  for (std::size_t index = at + 2; index < at + length; ++index) {
    if (byte(index) < 0x80 || byte(index) > 0xbf) return 0;
  }
  return length;
}

// Appends `text` with what would break a line or a JSON string escaped:
// quotes and backslashes, control characters, and invalid UTF-8 (as
// U+FFFD), so that whatever a peer sent cannot forge a line.
void append_escaped(std::string& out, std::string_view text) {
  for (std::size_t at = 0; at < text.size();) {
    const unsigned char c = static_cast<unsigned char>(text[at]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\u00";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      const std::size_t length = utf8_length(text, at);
      if (length == 0) {
        out += "\\ufffd";
        ++at;
        continue;
      }
      out.append(text.substr(at, length));
      at += length;
      continue;
    }
    ++at;
  }
}

std::string quoted(std::string_view text) {
  std::string out = "\"";
  append_escaped(out, text);
  out += '"';
  return out;
}

// A text value goes bare when a reader splitting on spaces gets it whole.
bool needs_quotes(std::string_view text) {
  if (text.empty()) return true;
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte <= 0x20 || byte >= 0x7f || c == '"' || c == '=' || c == '\\') return true;
  }
  return false;
}

// Escapes `%` for spdlog's pattern, in the process name.
std::string pattern_literal(std::string_view text) {
  std::string out;
  for (const char c : text) {
    if (c == '%') out += '%';
    out += c;
  }
  return out;
}

std::string pattern_for(const Settings& settings) {
  if (settings.format == Format::json) {
    std::string process;
    append_escaped(process, settings.process);
    return "{\"time\":\"%Y-%m-%dT%H:%M:%S.%fZ\",\"level\":\"%l\",\"process\":\"" + pattern_literal(process) +
           "\",\"pid\":%P,%v}";
  }
  return "%Y-%m-%dT%H:%M:%S.%eZ %l " + pattern_literal(settings.process) + ": %v";
}

struct ProcessLog {
  ProcessLog() : logger("fmwire", std::make_shared<spdlog::sinks::stderr_sink_mt>()) {
    logger.flush_on(spdlog::level::trace);  // a line is out when the call returns: tests and tails read it live
    apply(settings);
  }

  void apply(const Settings& next) {
    settings = next;
    logger.set_formatter(std::make_unique<spdlog::pattern_formatter>(pattern_for(next), spdlog::pattern_time_type::utc,
                                                                     std::string("\n")));
    logger.set_level(to_spdlog(next.level));
  }

  Settings settings;
  spdlog::logger logger;
};

ProcessLog& process_log() {
  static ProcessLog log;
  return log;
}

}  // namespace

std::optional<Level> parse_level(std::string_view name) {
  if (name == "debug") return Level::debug;
  if (name == "info") return Level::info;
  if (name == "warn" || name == "warning") return Level::warn;
  if (name == "error") return Level::error;
  if (name == "off") return Level::off;
  return std::nullopt;
}

std::optional<Format> parse_format(std::string_view name) {
  if (name == "text") return Format::text;
  if (name == "json") return Format::json;
  return std::nullopt;
}

void configure(const Settings& settings) { process_log().apply(settings); }

const Settings& settings() { return process_log().settings; }

std::string Field::text() const {
  if (const auto* text = std::get_if<std::string_view>(&value_)) return std::string(*text);
  if (const auto* flag = std::get_if<bool>(&value_)) return *flag ? "true" : "false";
  if (const auto* real = std::get_if<double>(&value_)) {
    char buffer[32];
    const auto [end, error] = std::to_chars(buffer, buffer + sizeof buffer, *real);
    return error == std::errc() ? std::string(buffer, end) : "nan";
  }
  if (const auto* whole = std::get_if<std::int64_t>(&value_)) return std::to_string(*whole);
  return std::to_string(std::get<std::uint64_t>(value_));
}

std::string Field::json() const {
  if (const auto* text = std::get_if<std::string_view>(&value_)) return quoted(*text);
  if (const auto* real = std::get_if<double>(&value_)) {
    if (*real != *real || *real - *real != 0) return "null";  // NaN and infinities have no JSON form
  }
  return text();
}

bool enabled(Level level) { return level != Level::off && process_log().logger.should_log(to_spdlog(level)); }

std::string format_line(Format format, std::string_view message, Fields fields) {
  std::string line;
  if (format == Format::json) {
    line = "\"msg\":";
    line += quoted(message);
    for (const Field& field : fields) {
      line += ',';
      line += quoted(field.key());
      line += ':';
      line += field.json();
    }
    return line;
  }
  append_escaped(line, message);
  for (const Field& field : fields) {
    line += ' ';
    line.append(field.key());
    line += '=';
    const std::string value = field.text();
    if (field.is_string() && needs_quotes(value)) {
      line += quoted(value);
    } else {
      line += value;
    }
  }
  return line;
}

void write(Level level, std::string_view message, Fields fields) {
  if (!enabled(level)) return;
  ProcessLog& log = process_log();
  const std::string line = format_line(log.settings.format, message, fields);
  log.logger.log(to_spdlog(level), spdlog::string_view_t(line.data(), line.size()));
}

}  // namespace fmwire::log
