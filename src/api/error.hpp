// Error reporting inside the library. Argument checks throw ApiError; every C entry point catches
// it (and anything else) at the boundary, records the message for the calling thread and returns
// the status. Nothing crosses the C ABI as an exception.
#ifndef FLASHLIN_SRC_API_ERROR_HPP_
#define FLASHLIN_SRC_API_ERROR_HPP_

#include <flashlin/flashlin.h>

#include <string>
#include <utility>

namespace flashlin::detail {

struct ApiError {
  flashlin_status status;
  std::string message;
};

// Records `message` as this thread's last error.
void set_last_error(std::string message);
const char* last_error_message();

// Runs `body` (which returns flashlin_status) and converts exceptions to status codes.
template <typename Body>
flashlin_status guarded(const char* function, Body&& body) noexcept {
  try {
    const flashlin_status status = std::forward<Body>(body)();
    return status;
  } catch (const ApiError& e) {
    set_last_error(e.message);
    return e.status;
  } catch (const std::bad_alloc&) {
    set_last_error(std::string(function) + ": out of host memory");
    return FLASHLIN_ERROR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    set_last_error(std::string(function) + ": internal error: " + e.what());
    return FLASHLIN_ERROR_BACKEND;
  } catch (...) {
    set_last_error(std::string(function) + ": unknown internal error");
    return FLASHLIN_ERROR_BACKEND;
  }
}

}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_ERROR_HPP_
