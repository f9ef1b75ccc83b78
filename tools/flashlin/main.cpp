// `flashlin`: command-line tool of the flashlin library (info, check, bench).
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "common.hpp"

namespace {

void print_usage(std::FILE* out) {
  std::fprintf(out,
               "usage: flashlin <command> [options]\n"
               "\n"
               "commands:\n"
               "  info    version, backends, CPU threads and SIMD level\n"
               "  check   every op configuration, form and dtype on every available backend\n"
               "          against the float64 reference, forward and backward (exit 1 on FAIL)\n"
               "  bench   CPU timings of the gated linear recurrence (float32), with GFLOP/s\n"
               "          and the fraction of the machine's sgemm rate\n"
               "\n"
               "Run 'flashlin <command> --help' for the options of a command.\n"
               "  --version   print the library version\n"
               "  --help      print this help\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(stderr);
    return 2;
  }
  const std::string command = argv[1];
  if (command == "--help" || command == "-h" || command == "help") {
    print_usage(stdout);
    return 0;
  }
  if (command == "--version" || command == "version") {
    std::printf("%s\n", flashlin_version());
    return 0;
  }
  int (*run)(int, char**) = nullptr;
  if (command == "info") run = flashlin_cli::run_info;
  if (command == "check") run = flashlin_cli::run_check;
  if (command == "bench") run = flashlin_cli::run_bench;
  if (run == nullptr) {
    std::fprintf(stderr, "flashlin: unknown command '%s'\n\n", command.c_str());
    print_usage(stderr);
    return 2;
  }
  try {
    return run(argc - 1, argv + 1);
  } catch (const flashlin_cli::UsageError& e) {
    std::fprintf(stderr, "flashlin %s: %s (see 'flashlin %s --help')\n", command.c_str(), e.what(),
                 command.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flashlin %s: error: %s\n", command.c_str(), e.what());
    return 1;
  }
}
