// Cap'n Proto Text fields as std::string_view, both ways, for the message
// homes: a Text::Reader is viewed in place; a string_view (not always
// NUL-terminated, which kj::StringPtr requires) is copied into a field
// initialised with its size.
#pragma once

#include <cstring>
#include <string_view>

#include <capnp/blob.h>

namespace fmwire::protocol {

inline std::string_view text_view(capnp::Text::Reader text) { return {text.cStr(), text.size()}; }

// `field` comes from init<Field>(text.size()).
inline void fill_text(capnp::Text::Builder field, std::string_view text) {
  if (!text.empty()) std::memcpy(field.begin(), text.data(), text.size());
}

inline unsigned text_size(std::string_view text) { return static_cast<unsigned>(text.size()); }

}  // namespace fmwire::protocol
