// `flashlin check`: runs every configuration of the gated linear recurrence -- the gate kinds, the
// RWKV-6 bonus, the three forms, the three storage dtypes, batched and packed (varlen) inputs --
// on every available backend, forward and backward, and compares each output and gradient with
// the float64 reference (tests/cpp/reference) evaluated on the very values the library was given
// (the inputs rounded to their storage dtype). Exit status 1 when any case fails.
#include <array>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "common.hpp"
#include "reference/reference.hpp"
#include "support/error_metrics.hpp"
#include "support/problem.hpp"

namespace flashlin_cli {
namespace {

using flashlin::DType;
using flashlin_test::BackwardResult;
using flashlin_test::dtype_name;
using flashlin_test::ForwardResult;
using flashlin_test::GateValues;
using flashlin_test::HostTensor;
using flashlin_test::Kind;
using flashlin_test::make_problem;
using flashlin_test::measure_error;
using flashlin_test::PortableRandom;
using flashlin_test::ProblemSpec;
using flashlin_test::RecurrenceProblem;
using flashlin_test::run_backward;
using flashlin_test::run_forward;

// Seed of one case: the run's seed mixed with the case's position in the grid.
uint64_t mix_seed(uint64_t seed, uint64_t position) {
  PortableRandom rng(seed ^ (position * 0x2545f4914f6cdd1dull));
  return rng.next_u64();
}

// ---------------------------------------------------------------------------------------------
// The configurations.

struct FormSpec {
  const char* name;
  flashlin_form form;
};
constexpr FormSpec kForms[] = {{"chunked", FLASHLIN_FORM_CHUNKED},
                               {"recurrent", FLASHLIN_FORM_RECURRENT},
                               {"parallel", FLASHLIN_FORM_PARALLEL}};

constexpr DType kDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// Pass bound on max|x - ref| / max|ref|, per tensor.
double tolerance(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return 5e-3;
    case DType::kBFloat16: return 2e-2;
    default: return 1e-3;
  }
}

// Batched: B sequences of T tokens, mild gates. Packed: B == 1 with cu_seqlens (lengths of 1 and
// 0 included), strong gates and a hard reset (g = -inf) in the gated configurations.
enum class Layout { kBatched, kPacked };

struct Sizes {
  int64_t batch_size = 2, time = 101, heads = 2, key_dim = 32, value_dim = 32;
  std::vector<int64_t> packed_lengths = {1, 0, 65, 35};  // sums to `time`
};

struct CaseSpec {
  const OpSpec* op;
  const FormSpec* form;
  DType dtype;
  Layout layout;
  const char* backend;
};

// Outputs and gradients compared, in table order.
enum TensorId { kO, kHt, kDq, kDk, kDv, kDg, kDu, kDh0, kNumTensors };
constexpr const char* kTensorNames[kNumTensors] = {"o", "ht", "dq", "dk", "dv", "dg", "du", "dh0"};

struct CaseResult {
  std::array<double, kNumTensors> error{};  // max|x - ref| / max|ref|
  std::array<bool, kNumTensors> checked{};  // false: the configuration has no such tensor
  std::string failure;                      // message of a call that threw
  bool pass = false;
};

// ---------------------------------------------------------------------------------------------
// Inputs (the library's tensors and, for the reference, the values they hold) and comparison.

// The problem of one case: g and u in the case's dtype, states float32. Batched: mild gates
// (RetNet's per-head constants for the per-head gate). Packed: strong gates and, for per-token and
// per-key gates, a hard reset.
ProblemSpec problem_spec(const CaseSpec& spec, const Sizes& sizes) {
  ProblemSpec s;
  s.kind = spec.op->kind;
  s.form = spec.form->form;
  s.dtype = s.gate_dtype = spec.dtype;
  s.state_dtype = DType::kFloat32;
  s.H = sizes.heads;
  s.K = sizes.key_dim;
  s.V = sizes.value_dim;
  const bool packed = spec.layout == Layout::kPacked;
  if (packed) {
    s.seq_lens = sizes.packed_lengths;
  } else {
    s.B = sizes.batch_size;
    s.T = sizes.time;
  }
  if (s.kind == Kind::kPerHead)
    s.gate_values = GateValues::kRetNet;
  else
    s.gate_values = packed ? GateValues::kStrong : GateValues::kRealistic;
  s.hard_reset = packed && s.has_dg();
  return s;
}

CaseResult run_case(const CaseSpec& spec, const Sizes& sizes, uint64_t seed) {
  CaseResult result;
  PortableRandom rng(seed);
  const RecurrenceProblem p = make_problem(problem_spec(spec, sizes), rng);
  const flashlin_ref::Outputs ref_out = flashlin_ref::forward(p.ref);
  const flashlin_ref::Grads ref_grads =
      flashlin_ref::backward(p.ref, p.ref_d_o, p.ref_d_final_state);

  // run_forward / run_backward poison every output with NaN first: an element the library does
  // not write makes the error NaN, which fails (an infinity makes it +inf).
  const auto compare = [&](TensorId id, const HostTensor& got, const std::vector<double>& want) {
    result.checked[id] = true;
    result.error[id] = measure_error(got.values(), want).rel_max;
  };
  try {
    const ForwardResult out = run_forward(p);
    compare(kO, out.o, ref_out.o);
    compare(kHt, out.final_state, ref_out.ht);
  } catch (const flashlin::Error& e) {
    result.failure = std::string("forward: ") + e.what();
  }
  try {
    const BackwardResult grads = run_backward(p);
    compare(kDq, grads.dq, ref_grads.dq);
    compare(kDk, grads.dk, ref_grads.dk);
    compare(kDv, grads.dv, ref_grads.dv);
    if (p.spec.has_dg()) compare(kDg, grads.dg, ref_grads.dg);
    if (p.spec.bonus()) compare(kDu, grads.du, ref_grads.du);
    compare(kDh0, grads.d_initial_state, ref_grads.dh0);
  } catch (const flashlin::Error& e) {
    if (!result.failure.empty()) result.failure += "; ";
    result.failure += std::string("backward: ") + e.what();
  }

  result.pass = result.failure.empty();
  const double tol = tolerance(spec.dtype);
  for (int id = 0; id < kNumTensors; ++id)
    if (result.checked[id] && !(result.error[id] <= tol)) result.pass = false;  // NaN fails
  return result;
}

// ---------------------------------------------------------------------------------------------
// Output.

std::string format_lengths(const std::vector<int64_t>& lengths) {
  std::string text;
  for (size_t i = 0; i < lengths.size(); ++i) text += (i ? "," : "") + std::to_string(lengths[i]);
  return text;
}

std::string layout_label(Layout layout, const Sizes& sizes) {
  if (layout == Layout::kPacked) return "varlen";
  return std::to_string(sizes.batch_size) + "x" + std::to_string(sizes.time);
}

constexpr const char* kRowFormat = "%-10s %-9s %-5s %-6s %-7s";

void print_table_header() {
  std::printf(kRowFormat, "op", "form", "dtype", "seqs", "backend");
  for (const char* name : kTensorNames) std::printf(" %8s", name);
  std::printf(" %7s  %s\n", "tol", "result");
}

void print_row(const CaseSpec& spec, const Sizes& sizes, const CaseResult& r) {
  std::printf(kRowFormat, spec.op->name, spec.form->name, dtype_name(spec.dtype),
              layout_label(spec.layout, sizes).c_str(), spec.backend);
  for (int id = 0; id < kNumTensors; ++id) {
    if (r.checked[id])
      std::printf(" %8.1e", r.error[id]);
    else
      std::printf(" %8s", "-");
  }
  std::printf(" %7.0e  %s\n", tolerance(spec.dtype), r.pass ? "PASS" : "FAIL");
  if (!r.failure.empty()) std::printf("    error: %s\n", r.failure.c_str());
}

// One line per failing case: which tensors missed the tolerance, or the error.
std::string failure_summary(const CaseSpec& spec, const Sizes& sizes, const CaseResult& r) {
  std::string text = std::string(spec.op->name) + " " + spec.form->name + " " +
                     dtype_name(spec.dtype) + " " + layout_label(spec.layout, sizes) + " " +
                     spec.backend + ":";
  const double tol = tolerance(spec.dtype);
  for (int id = 0; id < kNumTensors; ++id) {
    if (!r.checked[id] || r.error[id] <= tol) continue;
    char buffer[64];
    std::snprintf(buffer, sizeof buffer, " %s %.2e", kTensorNames[id], r.error[id]);
    text += buffer;
  }
  if (!r.failure.empty()) text += " " + r.failure;
  return text;
}

void print_help() {
  std::printf(
      "usage: flashlin check [--backend cpu|cuda|all] [--quick] [--seed N]\n"
      "\n"
      "Runs every configuration of the gated linear recurrence forward and backward and compares\n"
      "every output (o, final state ht) and gradient (dq, dk, dv, dg, du, d initial state dh0)\n"
      "with the float64 reference, evaluated on the inputs as stored (rounded to their dtype).\n"
      "  ops:    linear (no gate), retention (per-head decay), simple_gla (per-token gate),\n"
      "          gla (per-key gate), rwkv6 (per-key gate + bonus u)\n"
      "  forms:  chunked, recurrent, parallel\n"
      "  dtypes: f32, f16, bf16 for q, k, v, o, g, u and their gradients (states: float32)\n"
      "  seqs:   BxT batched inputs with mild gates, and 'varlen': packed sequences (cu_seqlens,\n"
      "          lengths 1 and 0 included) with strong gates and a hard reset (g = -inf)\n"
      "Error = max|x - ref| / max|ref| per tensor; tolerance f32 1e-3, f16 5e-3, bf16 2e-2.\n"
      "Outputs are poisoned with NaN before each call, so an unwritten element fails.\n"
      "\n"
      "options:\n"
      "  --backend B   cpu, cuda or all (default all: the CPU and, when built, CUDA)\n"
      "  --quick       smaller problems (T=67, K=V=16)\n"
      "  --seed N      seed of the random inputs (default 1); each case derives its own\n"
      "\n"
      "Exit status: 0 all PASS, 1 a case failed (or the backend asked for is not available),\n"
      "2 bad command line.\n");
}

}  // namespace

int run_check(int argc, char** argv) {
  ArgList args(argc, argv);
  if (args.flag("--help") || args.flag("-h")) {
    print_help();
    return 0;
  }
  std::string backend = "all";
  args.value("--backend", &backend);
  if (backend != "cpu" && backend != "cuda" && backend != "all")
    throw UsageError("--backend must be cpu, cuda or all, got '" + backend + "'");
  const bool quick = args.flag("--quick");
  int64_t seed = 1;
  args.int_value("--seed", &seed, 0, std::numeric_limits<int64_t>::max());
  args.finish();

  Sizes sizes;
  if (quick) {
    sizes.time = 67;
    sizes.key_dim = sizes.value_dim = 16;
    sizes.packed_lengths = {1, 0, 40, 26};
  }
  const double start = now_seconds();

  std::printf("flashlin %s check: cpu threads %d, seed %lld\n", flashlin_version(),
              effective_cpu_threads(), static_cast<long long>(seed));
  std::printf(
      "cases:  H=%lld K=%lld V=%lld, initial_state, random d_o and d_final_state;\n"
      "        %s = batch of B=%lld sequences of T=%lld, mild gates;\n"
      "        varlen = packed sequences of lengths %s (cu_seqlens), strong gates and a\n"
      "        hard reset (g = -inf)\n",
      static_cast<long long>(sizes.heads), static_cast<long long>(sizes.key_dim),
      static_cast<long long>(sizes.value_dim), layout_label(Layout::kBatched, sizes).c_str(),
      static_cast<long long>(sizes.batch_size), static_cast<long long>(sizes.time),
      format_lengths(sizes.packed_lengths).c_str());
  std::printf(
      "dtype:  of q, k, v, g, u, o and their gradients; states (h0, ht, dht, dh0) float32\n");
  std::printf(
      "error:  max|x - ref| / max|ref| per tensor vs the float64 reference on the stored\n"
      "        inputs; '-': the configuration has no such tensor\n");

  std::vector<const char*> backends;
  if (backend != "cuda") backends.push_back("cpu");
  bool cuda_missing = false;
  if (backend != "cpu") {
    if (!flashlin_has_cuda()) {
      std::printf("cuda: not available in this build (skipped)\n");
      cuda_missing = true;
    } else if (flashlin_cuda_device_count() <= 0) {
      std::printf("cuda: built, but no CUDA device is visible (skipped)\n");
      cuda_missing = true;
    } else {
      // The check keeps its tensors in host memory; running them on the GPU needs device
      // allocations, which this tool does not make yet.
      std::printf(
          "cuda: built, %d device(s), but 'flashlin check' runs host tensors only "
          "(skipped)\n",
          flashlin_cuda_device_count());
      cuda_missing = true;
    }
  }
  if (backends.empty()) {
    std::printf("nothing checked\n");
    return cuda_missing ? 1 : 0;
  }
  std::printf("\n");

  int num_cases = 0, num_failed = 0;
  uint64_t grid_index = 0;  // position of (op, form, dtype, layout) in the grid
  std::vector<std::string> failures;
  print_table_header();
  for (const OpSpec& op : kOpSpecs) {
    for (const FormSpec& form : kForms) {
      for (const DType dtype : kDTypes) {
        for (const Layout layout : {Layout::kBatched, Layout::kPacked}) {
          // Each case draws its own inputs from the seed and its grid position (the same on
          // every backend).
          const uint64_t case_seed = mix_seed(static_cast<uint64_t>(seed), grid_index++);
          for (const char* backend_name : backends) {
            const CaseSpec spec{&op, &form, dtype, layout, backend_name};
            const CaseResult result = run_case(spec, sizes, case_seed);
            print_row(spec, sizes, result);
            ++num_cases;
            if (!result.pass) {
              ++num_failed;
              failures.push_back(failure_summary(spec, sizes, result));
            }
          }
        }
      }
    }
  }

  std::printf("\n%d cases: %d PASS, %d FAIL (%.1f s)\n", num_cases, num_cases - num_failed,
              num_failed, now_seconds() - start);
  for (const std::string& line : failures) std::printf("FAIL %s\n", line.c_str());
  return num_failed > 0 ? 1 : 0;
}

}  // namespace flashlin_cli
