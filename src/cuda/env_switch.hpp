// Environment switches of the CUDA backend (host): each is read at every call, so that a
// benchmark can compare two paths in one process by setting and clearing it.
#ifndef FLASHLIN_SRC_CUDA_ENV_SWITCH_HPP_
#define FLASHLIN_SRC_CUDA_ENV_SWITCH_HPP_

#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace flashlin::cuda {

// Whether the variable `name` is set to one of `values`.
inline bool env_is(const char* name, std::initializer_list<const char*> values) {
  const char* value = std::getenv(name);
  if (value == nullptr) return false;
  for (const char* candidate : values)
    if (std::strcmp(value, candidate) == 0) return true;
  return false;
}

// Whether the variable `name` is set to anything but "" and "0".
inline bool env_on(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_ENV_SWITCH_HPP_
