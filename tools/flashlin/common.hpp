// Shared pieces of the `flashlin` command-line tool: subcommand entry points, a small argument
// parser, a wall-clock timer and the op configurations. Host tensors, dtypes, random problems and
// error metrics come from the test support library (tests/cpp/support/), shared with the tests.
#ifndef FLASHLIN_TOOLS_COMMON_HPP_
#define FLASHLIN_TOOLS_COMMON_HPP_

#include <flashlin/flashlin.hpp>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/problem.hpp"

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

// The configurations of the op family (DESIGN.md §3), named after the model each is known for.
struct OpSpec {
  const char* name;
  flashlin_test::Kind kind;  // the gate kind; kPerKeyBonus: the RWKV-6 variant
  const char* description;   // the gate, in words
};
inline constexpr OpSpec kOpSpecs[] = {
    {"linear", flashlin_test::Kind::kNone, "no gate"},
    {"retention", flashlin_test::Kind::kPerHead, "constant per-head decay"},
    {"simple_gla", flashlin_test::Kind::kPerToken, "scalar gate per token"},
    {"gla", flashlin_test::Kind::kPerKey, "per-key gate"},
    {"rwkv6", flashlin_test::Kind::kPerKeyBonus, "per-key gate + bonus u"},
};

// Threads the CPU backend will use (flashlin_get_num_threads() with 0 resolved).
int effective_cpu_threads();

}  // namespace flashlin_cli

#endif  // FLASHLIN_TOOLS_COMMON_HPP_
