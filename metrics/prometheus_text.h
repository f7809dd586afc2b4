// A /metrics page in the Prometheus text format 0.0.4: families (a # HELP
// and a # TYPE line) and their samples, label values escaped, numbers as
// the format reads them; and Histogram, fixed-bound bucket counts kept by
// one thread and rendered as a Prometheus histogram. The numbers a page
// shows are gathered by its owner (a snapshot taken on the thread that
// keeps them); this file only writes text.
// Format: https://prometheus.io/docs/instrumenting/exposition_formats/
#pragma once

#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace fmwire::metrics {

struct Label {
  std::string_view name;
  std::string_view value;
};

class PrometheusText {
 public:
  // Starts a family: `type` is counter, gauge, histogram or summary.
  PrometheusText& family(std::string_view name, std::string_view type, std::string_view help);
  // One sample: `name` is the family's, or its _bucket/_sum/_count series.
  PrometheusText& sample(std::string_view name, std::initializer_list<Label> labels, std::uint64_t value);
  PrometheusText& sample(std::string_view name, std::initializer_list<Label> labels, double value);
  // A family of one unlabelled sample.
  PrometheusText& counter(std::string_view name, std::string_view help, std::uint64_t value);
  PrometheusText& gauge(std::string_view name, std::string_view help, double value);

  const std::string& text() const { return out_; }
  std::string take() { return std::move(out_); }

  // A number as the format writes it (%.9g; +Inf, -Inf and NaN spelled so).
  static std::string number(double value);
  // A label value with backslash, double quote and newline escaped.
  static std::string label_value(std::string_view text);

 private:
  void series(std::string_view name, std::initializer_list<Label> labels);

  std::string out_;
};

// Bucket counts for fixed upper bounds (ascending, +Inf implied), their
// sum, kept by one thread with plain numbers: whoever wants them from
// another thread takes a copy on the keeping thread.
class Histogram {
 public:
  explicit Histogram(std::span<const double> bounds);
  void observe(double value);
  std::uint64_t count() const;
  double sum() const { return sum_; }
  // The family: _bucket{le=...} cumulative, _sum and _count.
  void render(PrometheusText& page, std::string_view name, std::string_view help) const;

 private:
  std::vector<double> bounds_;
  std::vector<std::uint64_t> buckets_;  // one per bound, then +Inf alone
  double sum_ = 0;
};

}  // namespace fmwire::metrics
