// `fmwire demo`: the wire format end to end in one process. Encodes one
// generation stream and one KV transfer into frames, delivers the bytes in
// random-sized pieces as a socket would, decodes them as they arrive, and
// prints what happened.
#pragma once

#include <cstdint>
#include <iosfwd>

namespace fmwire::cli {

struct DemoOptions {
  std::uint32_t seed = 1;
  std::uint32_t kv_bytes = 1 << 20;    // one KV chunk of fp16 data
  std::uint32_t max_piece_bytes = 4096;
  bool quiet = false;                   // summary only
};

// Returns 0 when every frame came back as sent.
int run_demo(const DemoOptions& options, std::ostream& out);

}  // namespace fmwire::cli
