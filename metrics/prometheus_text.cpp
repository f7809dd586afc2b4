#include "metrics/prometheus_text.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace fmwire::metrics {

std::string PrometheusText::number(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  char text[64];
  std::snprintf(text, sizeof text, "%.9g", value);
  return text;
}

std::string PrometheusText::label_value(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    if (c == '\\' || c == '"') out += '\\';
    out += c;
  }
  return out;
}

PrometheusText& PrometheusText::family(std::string_view name, std::string_view type, std::string_view help) {
  out_ += "# HELP ";
  out_ += name;
  out_ += ' ';
  out_ += help;
  out_ += "\n# TYPE ";
  out_ += name;
  out_ += ' ';
  out_ += type;
  out_ += '\n';
  return *this;
}

void PrometheusText::series(std::string_view name, std::initializer_list<Label> labels) {
  out_ += name;
  if (labels.size() > 0) {
    out_ += '{';
    bool first = true;
    for (const Label& label : labels) {
      if (!first) out_ += ',';
      first = false;
      out_ += label.name;
      out_ += "=\"";
      out_ += label_value(label.value);
      out_ += '"';
    }
    out_ += '}';
  }
  out_ += ' ';
}

PrometheusText& PrometheusText::sample(std::string_view name, std::initializer_list<Label> labels, std::uint64_t value) {
  series(name, labels);
  out_ += std::to_string(value);
  out_ += '\n';
  return *this;
}

PrometheusText& PrometheusText::sample(std::string_view name, std::initializer_list<Label> labels, double value) {
  series(name, labels);
  out_ += number(value);
  out_ += '\n';
  return *this;
}

PrometheusText& PrometheusText::counter(std::string_view name, std::string_view help, std::uint64_t value) {
  return family(name, "counter", help).sample(name, {}, value);
}

PrometheusText& PrometheusText::gauge(std::string_view name, std::string_view help, double value) {
  return family(name, "gauge", help).sample(name, {}, value);
}

Histogram::Histogram(std::span<const double> bounds)
    : bounds_(bounds.begin(), bounds.end()), buckets_(bounds.size() + 1, 0) {}

void Histogram::observe(double value) {
  const auto bound = std::lower_bound(bounds_.begin(), bounds_.end(), value);  // the first bound >= value
  ++buckets_[static_cast<std::size_t>(bound - bounds_.begin())];
  sum_ += value;
}

std::uint64_t Histogram::count() const {
  std::uint64_t total = 0;
  for (const std::uint64_t bucket : buckets_) total += bucket;
  return total;
}

void Histogram::render(PrometheusText& page, std::string_view name, std::string_view help) const {
  page.family(name, "histogram", help);
  const std::string bucket = std::string(name) + "_bucket";
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += buckets_[i];
    page.sample(bucket, {{"le", PrometheusText::number(bounds_[i])}}, cumulative);
  }
  cumulative += buckets_.back();
  page.sample(bucket, {{"le", "+Inf"}}, cumulative);
  page.sample(std::string(name) + "_sum", {}, sum_);
  page.sample(std::string(name) + "_count", {}, cumulative);
}

}  // namespace fmwire::metrics
