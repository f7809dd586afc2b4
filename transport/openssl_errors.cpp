#include "transport/openssl_errors.h"

#include <openssl/err.h>

namespace fmwire::transport {

std::string openssl_errors() {
  std::string text;
  while (const unsigned long code = ERR_get_error()) {
    char buffer[256];
    ERR_error_string_n(code, buffer, sizeof buffer);
    if (!text.empty()) text += "; ";
    text += buffer;
  }
  return text.empty() ? std::string("no reason given") : text;
}

}  // namespace fmwire::transport
