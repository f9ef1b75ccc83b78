// Shared pieces of the `flashlin` command-line tool: subcommand entry points, a small argument
// parser, host tensors in any of the ABI's dtypes, and a wall-clock timer.
#ifndef FLASHLIN_TOOLS_COMMON_HPP_
#define FLASHLIN_TOOLS_COMMON_HPP_

#include <flashlin/flashlin.hpp>

#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "half.hpp"

namespace flashlin_cli {

// Subcommands: argv[0] is the subcommand's name; the return value is the process exit code.
int run_info(int argc, char** argv);
int run_check(int argc, char** argv);
int run_bench(int argc, char** argv);

// Thrown on a malformed command line; main prints it with the usage and exits with 2.
struct UsageError : std::runtime_error {
  explicit UsageError(const std::string& message) : std::runtime_error(message) {}
};

// Options are "--name value", "--name=value" or flags "--name". Every option must be consumed
// (looked up) before finish(), which rejects anything left over.
class ArgList {
 public:
  ArgList(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) args_.emplace_back(argv[i]);
    used_.assign(args_.size(), false);
  }

  bool flag(const std::string& name) {
    bool found = false;
    for (size_t i = 0; i < args_.size(); ++i) {
      if (!used_[i] && args_[i] == name) {
        used_[i] = true;
        found = true;
      }
    }
    return found;
  }

  bool value(const std::string& name, std::string* out) {
    bool found = false;
    for (size_t i = 0; i < args_.size(); ++i) {
      if (used_[i]) continue;
      if (args_[i] == name) {
        if (i + 1 >= args_.size()) throw UsageError("option " + name + " needs a value");
        *out = args_[i + 1];
        used_[i] = used_[i + 1] = true;
        found = true;
        ++i;
      } else if (args_[i].compare(0, name.size() + 1, name + "=") == 0) {
        *out = args_[i].substr(name.size() + 1);
        used_[i] = true;
        found = true;
      }
    }
    return found;
  }

  // An integer option in [lo, hi]; keeps *out unchanged when absent.
  bool int_value(const std::string& name, int64_t* out, int64_t lo, int64_t hi) {
    std::string text;
    if (!value(name, &text)) return false;
    char* end = nullptr;
    errno = 0;
    const long long parsed = std::strtoll(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno != 0)
      throw UsageError("option " + name + " expects an integer, got '" + text + "'");
    if (parsed < lo || parsed > hi)
      throw UsageError("option " + name + " must be in [" + std::to_string(lo) + ", " +
                       std::to_string(hi) + "], got " + text);
    *out = parsed;
    return true;
  }

  void finish() const {
    for (size_t i = 0; i < args_.size(); ++i)
      if (!used_[i]) throw UsageError("unexpected argument '" + args_[i] + "'");
  }

 private:
  std::vector<std::string> args_;
  std::vector<bool> used_;
};

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline const char* dtype_name(flashlin::DType dtype) {
  switch (dtype) {
    case flashlin::DType::kFloat32: return "f32";
    case flashlin::DType::kFloat16: return "f16";
    case flashlin::DType::kBFloat16: return "bf16";
    case flashlin::DType::kFloat64: return "f64";
    case flashlin::DType::kInt32: return "i32";
    case flashlin::DType::kInt64: return "i64";
  }
  return "?";
}

inline size_t dtype_size(flashlin::DType dtype) {
  switch (dtype) {
    case flashlin::DType::kFloat16:
    case flashlin::DType::kBFloat16: return 2;
    case flashlin::DType::kFloat32:
    case flashlin::DType::kInt32: return 4;
    case flashlin::DType::kFloat64:
    case flashlin::DType::kInt64: return 8;
  }
  return 4;
}

// A compact row-major tensor in host memory, in any dtype of the ABI, with its DLPack view.
// Values go in and out as double; storing rounds to the dtype (ties to even).
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(flashlin::DType dtype, std::vector<int64_t> shape) : dtype_(dtype) {
    numel_ = 1;
    for (int64_t d : shape) numel_ *= d;
    const size_t bytes = static_cast<size_t>(numel_) * dtype_size(dtype);
    storage_.assign((bytes + 63) / 64 + 1, Block{});  // 64-byte blocks; +1 so that 0 elements is fine
    view_ = flashlin::TensorView(storage_.data(), dtype, std::move(shape));
  }
  HostTensor(HostTensor&&) = default;
  HostTensor& operator=(HostTensor&&) = default;
  HostTensor(const HostTensor&) = delete;
  HostTensor& operator=(const HostTensor&) = delete;

  bool empty() const { return storage_.empty(); }
  int64_t numel() const { return numel_; }
  size_t bytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }
  flashlin::DType dtype() const { return dtype_; }
  void* data() { return storage_.data(); }
  const void* data() const { return storage_.data(); }
  DLTensor* dl() { return empty() ? nullptr : view_.get(); }
  const DLTensor* dl() const { return empty() ? nullptr : view_.get(); }

  void store(int64_t i, double x) {
    void* p = storage_.data();
    switch (dtype_) {
      case flashlin::DType::kFloat32: static_cast<float*>(p)[i] = static_cast<float>(x); break;
      case flashlin::DType::kFloat16:
        static_cast<uint16_t*>(p)[i] = float_to_half(static_cast<float>(x));
        break;
      case flashlin::DType::kBFloat16:
        static_cast<uint16_t*>(p)[i] = float_to_bfloat16(static_cast<float>(x));
        break;
      case flashlin::DType::kFloat64: static_cast<double*>(p)[i] = x; break;
      case flashlin::DType::kInt32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(x); break;
      case flashlin::DType::kInt64: static_cast<int64_t*>(p)[i] = static_cast<int64_t>(x); break;
    }
  }

  double load(int64_t i) const {
    const void* p = storage_.data();
    switch (dtype_) {
      case flashlin::DType::kFloat32: return static_cast<const float*>(p)[i];
      case flashlin::DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
      case flashlin::DType::kBFloat16: return bfloat16_to_float(static_cast<const uint16_t*>(p)[i]);
      case flashlin::DType::kFloat64: return static_cast<const double*>(p)[i];
      case flashlin::DType::kInt32: return static_cast<const int32_t*>(p)[i];
      case flashlin::DType::kInt64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    }
    return 0;
  }

  // Stores f(i) for every element i.
  template <class F>
  void fill(F&& f) {
    for (int64_t i = 0; i < numel_; ++i) store(i, f(i));
  }
  void set(const std::vector<double>& values) {
    if (static_cast<int64_t>(values.size()) != numel_)
      throw std::logic_error("HostTensor::set: size mismatch");
    fill([&](int64_t i) { return values[static_cast<size_t>(i)]; });
  }
  std::vector<double> get() const {
    std::vector<double> out(static_cast<size_t>(numel_));
    for (int64_t i = 0; i < numel_; ++i) out[static_cast<size_t>(i)] = load(i);
    return out;
  }
  // Fills floating-point storage with quiet NaNs, so that an element the library did not write
  // shows up as a failure.
  void poison() {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    void* p = storage_.data();
    switch (dtype_) {
      case flashlin::DType::kFloat16:
        for (int64_t i = 0; i < numel_; ++i) static_cast<uint16_t*>(p)[i] = kHalfNaN;
        break;
      case flashlin::DType::kBFloat16:
        for (int64_t i = 0; i < numel_; ++i) static_cast<uint16_t*>(p)[i] = kBFloat16NaN;
        break;
      case flashlin::DType::kFloat32:
      case flashlin::DType::kFloat64: fill([&](int64_t) { return nan; }); break;
      default: break;
    }
  }

 private:
  struct alignas(64) Block {
    unsigned char bytes[64];
  };
  flashlin::DType dtype_ = flashlin::DType::kFloat32;
  int64_t numel_ = 0;
  std::vector<Block> storage_;
  flashlin::TensorView view_;
};

// The configurations of the op family (DESIGN.md §3), named after the model each is known for.
struct OpSpec {
  const char* name;
  flashlin_gate_kind gate;
  bool bonus;               // RWKV-6 variant
  const char* description;  // the gate, in words
};
inline constexpr OpSpec kOpSpecs[] = {
    {"linear", FLASHLIN_GATE_NONE, false, "no gate"},
    {"retention", FLASHLIN_GATE_PER_HEAD, false, "constant per-head decay"},
    {"simple_gla", FLASHLIN_GATE_PER_TOKEN, false, "scalar gate per token"},
    {"gla", FLASHLIN_GATE_PER_KEY, false, "per-key gate"},
    {"rwkv6", FLASHLIN_GATE_PER_KEY, true, "per-key gate + bonus u"},
};

// Random numbers that are the same with every standard library (std::normal_distribution is not):
// splitmix64, uniform in (0, 1], normal by Box-Muller.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}

  uint64_t next_u64() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return (static_cast<double>(next_u64() >> 11) + 1.0) * 0x1.0p-53; }
  double normal() {
    const double radius = std::sqrt(-2.0 * std::log(uniform()));
    return radius * std::cos(6.283185307179586 * uniform());
  }

 private:
  uint64_t state_;
};

// log(sigmoid(x)) without overflow: the usual way to draw realistic log decays (<= 0).
inline double log_sigmoid(double x) {
  return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x));
}

// Threads the CPU backend will use (flashlin_get_num_threads() with 0 resolved).
int effective_cpu_threads();

}  // namespace flashlin_cli

#endif  // FLASHLIN_TOOLS_COMMON_HPP_
