// `flashlin bench`: CPU timings (float32) of the gated linear recurrence in its three forms --
// chunked forward and forward+backward at the headline size, recurrent and parallel at sizes that
// suit them, one decode step with the state updated in place -- next to an OpenBLAS sgemm rate
// measured in the same run, so that GFLOP/s read as a fraction of what the machine can do.
// Times are wall clock, the median of several runs after a warm-up; FLOPs follow a fixed model
// (printed in the footer and in --help), not a count of what the backend happens to execute.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"
#include "support/problem.hpp"

#if defined(FLASHLIN_HAVE_CBLAS) && FLASHLIN_HAVE_CBLAS
#include <cblas.h>
extern "C" {
// OpenBLAS extensions, declared weak: another BLAS without them still links (they are then null).
__attribute__((weak)) void openblas_set_num_threads(int num_threads);
__attribute__((weak)) char* openblas_get_config(void);
}
#endif

namespace flashlin_cli {
namespace {

using flashlin_test::GateValues;
using flashlin_test::HostTensor;
using flashlin_test::Kind;
using flashlin_test::make_problem;
using flashlin_test::PortableRandom;
using flashlin_test::ProblemSpec;
using flashlin_test::RecurrenceProblem;

constexpr int64_t kChunkSize = 64;  // the library's default, used by every chunked row

struct Shape {
  int64_t batch, heads, time, key_dim, value_dim;
};

// printf into a std::string.
template <class... Args>
std::string format(const char* fmt, Args... args) {
  char buffer[256];
  std::snprintf(buffer, sizeof buffer, fmt, args...);
  return buffer;
}

std::string shape_label(const Shape& s) {
  return "B=" + std::to_string(s.batch) + " H=" + std::to_string(s.heads) +
         " T=" + std::to_string(s.time) + " K=" + std::to_string(s.key_dim) +
         " V=" + std::to_string(s.value_dim);
}

// ---------------------------------------------------------------------------------------------
// FLOP model: useful multiply-adds (counted as 2) of one pass, per token per head.

double forward_flops_per_token_head(flashlin_form form, const Shape& s) {
  const double C = kChunkSize, K = s.key_dim, V = s.value_dim, T = s.time;
  switch (form) {
    case FLASHLIN_FORM_CHUNKED: return 2 * C * (K + V) + 4 * K * V;
    case FLASHLIN_FORM_RECURRENT: return 4 * K * V;
    case FLASHLIN_FORM_PARALLEL: return T * (K + V);  // 2 T^2 (K+V) / 2 per sequence and head
  }
  return 0;
}

double backward_flops_per_token_head(flashlin_form form, const Shape& s) {
  const double C = kChunkSize, K = s.key_dim, V = s.value_dim, T = s.time;
  switch (form) {
    case FLASHLIN_FORM_CHUNKED: return 2 * C * (3 * K + 2 * V) + 10 * K * V;
    case FLASHLIN_FORM_RECURRENT: return 8 * K * V;
    case FLASHLIN_FORM_PARALLEL: return T * (3 * K + 2 * V);
  }
  return 0;
}

double model_flops(flashlin_form form, bool with_backward, const Shape& s) {
  double per_token_head = forward_flops_per_token_head(form, s);
  if (with_backward) per_token_head += backward_flops_per_token_head(form, s);
  return per_token_head * static_cast<double>(s.batch * s.time * s.heads);
}

constexpr const char* kFlopModel =
    "FLOP model, per token per head (C = chunk size 64; multiply + add = 2 FLOPs):\n"
    "  chunked    fwd 2C(K+V) + 4KV    bwd 2C(3K+2V) + 10KV\n"
    "  recurrent  fwd 4KV              bwd 8KV\n"
    "  parallel   fwd T(K+V)           bwd T(3K+2V)   (causal half of the T x T products)\n"
    "  fwd+bwd = fwd + bwd (one forward call, then one backward call that recomputes states);\n"
    "  decode GB/s: the float32 state read and written once per step, 2*B*H*K*V*4 bytes.\n";

// ---------------------------------------------------------------------------------------------
// Timing.

struct TimingPolicy {
  double budget_s;  // keep repeating while the runs so far took less than this
  int min_runs, max_runs;
};

// Median wall time in seconds of `run`, after one warm-up call.
template <class Run>
double median_seconds(Run&& run, const TimingPolicy& policy) {
  run();
  std::vector<double> times;
  double spent = 0;
  while (static_cast<int>(times.size()) < policy.min_runs ||
         (spent < policy.budget_s && static_cast<int>(times.size()) < policy.max_runs)) {
    const double start = now_seconds();
    run();
    times.push_back(now_seconds() - start);
    spent += times.back();
  }
  std::sort(times.begin(), times.end());
  const size_t n = times.size();
  return n % 2 ? times[n / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
}

// ---------------------------------------------------------------------------------------------
// Problems: float32 tensors of one shape, random, with the gradient buffers a backward writes.

class Workload {
 public:
  // with_state: an initial state that the forward updates in place (decode).
  Workload(const OpSpec& op, const Shape& s, bool with_grads, bool with_state, uint64_t seed)
      : shape_(s) {
    using flashlin::DType;
    ProblemSpec spec;
    spec.kind = op.kind;
    spec.B = s.batch;
    spec.T = s.time;
    spec.H = s.heads;
    spec.K = s.key_dim;
    spec.V = s.value_dim;
    spec.gate_values = op.kind == Kind::kPerHead ? GateValues::kRetNet : GateValues::kRealistic;
    spec.chunk_size = static_cast<int>(kChunkSize);
    spec.initial_state = with_state;
    spec.d_final_state = false;
    PortableRandom rng(seed);
    problem_ = make_problem(spec, rng);

    const int64_t B = s.batch, T = s.time, H = s.heads, K = s.key_dim, V = s.value_dim;
    o_ = HostTensor(DType::kFloat32, {B, T, H, V});  // HostTensors start zeroed
    if (with_grads) {                                // no d_initial_state
      grads_.dq = HostTensor(DType::kFloat32, {B, T, H, K});
      grads_.dk = HostTensor(DType::kFloat32, {B, T, H, K});
      grads_.dv = HostTensor(DType::kFloat32, {B, T, H, V});
      if (spec.has_dg()) grads_.dg = HostTensor(DType::kFloat32, problem_.gate_shape());
      if (spec.bonus()) grads_.du = HostTensor(DType::kFloat32, {H, K});
    }
  }

  flashlin::RecurrenceConfig config(flashlin_form form) const {
    flashlin::RecurrenceConfig c = problem_.config();
    c.with_form(form);
    return c;
  }

  // With a state, final_state is the initial state itself: the step updates it in place.
  void forward(flashlin_form form) {
    flashlin::recurrence_forward(config(form), problem_.inputs(), o_.dl(),
                                 problem_.initial_state.dl());
  }

  void backward(flashlin_form form) {
    flashlin::recurrence_backward(config(form), problem_.inputs(), problem_.d_o.dl(), nullptr,
                                  grads_.grads());
  }

  const Shape& shape() const { return shape_; }
  size_t state_bytes() const {
    const HostTensor& state = problem_.initial_state;
    return static_cast<size_t>(state.numel()) * flashlin_test::dtype_bytes(state.dtype());
  }

 private:
  Shape shape_;
  RecurrenceProblem problem_;  // q, k, v, g, u, the state (decode) and d_o
  HostTensor o_;
  flashlin_test::BackwardResult grads_;  // the buffers backward() writes
};

// ---------------------------------------------------------------------------------------------
// Results.

struct Row {
  std::string form, pass, config;
  double seconds = 0, flops = 0;
  double state_bytes_per_s = -1;  // decode only
  std::vector<int64_t> dims;      // B, H, T, K, V (empty for sgemm)
  int64_t gemm_size = 0;          // sgemm only
};

// Times one forward call, or a forward call then a backward call, of `form` on `work`.
Row time_pass(Workload& work, const char* form_name, flashlin_form form, bool with_backward,
              const TimingPolicy& policy) {
  const Shape& s = work.shape();
  Row row;
  row.form = form_name;
  row.pass = with_backward ? "fwd+bwd" : "fwd";
  row.config = shape_label(s);
  row.dims = {s.batch, s.heads, s.time, s.key_dim, s.value_dim};
  row.flops = model_flops(form, with_backward, s);
  row.seconds = median_seconds(
      [&] {
        work.forward(form);
        if (with_backward) work.backward(form);
      },
      policy);
  return row;
}

class Report {
 public:
  Report(double sgemm_gflops, const std::string& gate_name, int threads, std::FILE* csv)
      : sgemm_gflops_(sgemm_gflops), gate_name_(gate_name), threads_(threads), csv_(csv) {
    std::printf("%-10s %-8s %-26s %10s %9s %8s\n", "form", "pass", "config", "ms", "GFLOP/s",
                "% sgemm");
    if (csv_)
      std::fprintf(csv_,
                   "form,pass,gate,batch,heads,time,key_dim,value_dim,gemm_size,threads,ms,gflop,"
                   "gflop_per_s,percent_of_sgemm,state_gb_per_s\n");
  }

  void add(const Row& row) {
    const double gflops = row.flops / row.seconds * 1e-9;
    const bool have_percent = sgemm_gflops_ > 0;
    const double percent = have_percent ? 100 * gflops / sgemm_gflops_ : 0;
    const bool decode = row.state_bytes_per_s >= 0;
    std::printf("%-10s %-8s %-26s %10.3f %9.1f %8s", row.form.c_str(), row.pass.c_str(),
                row.config.c_str(), row.seconds * 1e3, gflops,
                have_percent ? format("%.1f%%", percent).c_str() : "-");
    if (decode) std::printf("  state r+w %.1f GB/s", row.state_bytes_per_s * 1e-9);
    std::printf("\n");
    std::fflush(stdout);
    if (!csv_) return;
    std::string dims = ",,,,";
    if (row.dims.size() == 5) {
      dims.clear();
      for (size_t i = 0; i < 5; ++i) dims += (i ? "," : "") + std::to_string(row.dims[i]);
    }
    std::fprintf(csv_, "%s,%s,%s,%s,%s,%d,%.4f,%.6f,%.3f,%s,%s\n", row.form.c_str(),
                 row.pass.c_str(), row.dims.empty() ? "" : gate_name_.c_str(), dims.c_str(),
                 row.gemm_size ? std::to_string(row.gemm_size).c_str() : "", threads_,
                 row.seconds * 1e3, row.flops * 1e-9, gflops,
                 have_percent ? format("%.2f", percent).c_str() : "",
                 decode ? format("%.3f", row.state_bytes_per_s * 1e-9).c_str() : "");
  }

 private:
  double sgemm_gflops_;
  std::string gate_name_;
  int threads_;
  std::FILE* csv_;
};

// ---------------------------------------------------------------------------------------------
// The sgemm baseline.

#if defined(FLASHLIN_HAVE_CBLAS) && FLASHLIN_HAVE_CBLAS
constexpr bool kHaveSgemm = true;

// C = A B with square float32 matrices of side n, row-major.
Row time_sgemm(int64_t n, const TimingPolicy& policy) {
  PortableRandom rng(7);
  std::vector<float> a(static_cast<size_t>(n * n)), b(a.size()), c(a.size());
  for (float& x : a) x = static_cast<float>(rng.normal());
  for (float& x : b) x = static_cast<float>(rng.normal());
  const int dim = static_cast<int>(n);
  Row row;
  row.form = "sgemm";
  row.pass = "-";
  row.config = "M=N=K=" + std::to_string(n);
  row.gemm_size = n;
  row.flops = 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  row.seconds = median_seconds(
      [&] {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, dim, dim, dim, 1.0f, a.data(), dim,
                    b.data(), dim, 0.0f, c.data(), dim);
      },
      policy);
  return row;
}

void set_blas_threads(int threads) {
  if (openblas_set_num_threads) openblas_set_num_threads(threads);
}

std::string blas_name() {
  if (!openblas_get_config) return "cblas";
  return openblas_get_config();  // e.g. "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Haswell ..."
}
#else
constexpr bool kHaveSgemm = false;
Row time_sgemm(int64_t, const TimingPolicy&) { return Row{}; }
void set_blas_threads(int) {}
std::string blas_name() { return ""; }
#endif

// ---------------------------------------------------------------------------------------------

const OpSpec& find_op(const std::string& name) {
  for (const OpSpec& op : kOpSpecs)
    if (name == op.name) return op;
  std::string names;
  for (const OpSpec& op : kOpSpecs) names += std::string(names.empty() ? "" : ", ") + op.name;
  throw UsageError("--gate must be one of " + names + ", got '" + name + "'");
}

void print_help() {
  std::printf(
      "usage: flashlin bench [--threads N] [--quick] [--gate OP] [--csv FILE]\n"
      "\n"
      "CPU timings (float32) of the gated linear recurrence, with GFLOP/s and the fraction of an\n"
      "OpenBLAS sgemm rate measured in the same run with the same thread count:\n"
      "  sgemm      M=N=K=1024 (the machine's dense float32 rate)\n"
      "  chunked    fwd and fwd+bwd at B=4 H=8 T=4096 K=V=64 (chunk size 64)\n"
      "  recurrent  fwd and fwd+bwd at B=4 H=8 T=4096 K=V=64\n"
      "  parallel   fwd and fwd+bwd at B=4 H=8 T=512 K=V=64\n"
      "  decode     recurrent fwd, T=1, B=16 H=8 K=V=128, state updated in place\n"
      "Each time is the median of several runs after a warm-up (wall clock).\n"
      "\n"
      "options:\n"
      "  --threads N   CPU threads for flashlin and OpenBLAS (default: flashlin's setting,\n"
      "                all hardware threads unless set)\n"
      "  --quick       small sizes (T=512, parallel T=128, sgemm 512): a few seconds\n"
      "  --gate OP     linear, retention, simple_gla, gla (default) or rwkv6\n"
      "  --csv FILE    also write the rows as CSV\n"
      "\n");
  std::printf("%s", kFlopModel);
}

}  // namespace

int run_bench(int argc, char** argv) {
  ArgList args(argc, argv);
  if (args.flag("--help") || args.flag("-h")) {
    print_help();
    return 0;
  }
  int64_t threads_option = 0;
  const bool threads_given = args.int_value("--threads", &threads_option, 1, 4096);
  const bool quick = args.flag("--quick");
  std::string gate_name = "gla";
  args.value("--gate", &gate_name);
  const OpSpec& op = find_op(gate_name);
  std::string csv_path;
  const bool want_csv = args.value("--csv", &csv_path);
  args.finish();

  std::unique_ptr<std::FILE, int (*)(std::FILE*)> csv(nullptr, &std::fclose);
  if (want_csv) {
    csv.reset(std::fopen(csv_path.c_str(), "w"));
    if (!csv) throw std::runtime_error("cannot open '" + csv_path + "' for writing");
  }

  if (threads_given) flashlin_set_num_threads(static_cast<int>(threads_option));
  const int threads = effective_cpu_threads();
  set_blas_threads(threads);

  const int64_t long_time = quick ? 512 : 4096;
  const int64_t parallel_time = quick ? 128 : 512;
  const int64_t sgemm_size = quick ? 512 : 1024;
  const Shape long_shape{4, 8, long_time, 64, 64};
  const Shape parallel_shape{4, 8, parallel_time, 64, 64};
  const Shape decode_shape{16, 8, 1, 128, 128};
  const TimingPolicy large{quick ? 0.3 : 3.0, 3, 20};
  const TimingPolicy decode{quick ? 0.1 : 0.5, 10, 1000};
  const double start = now_seconds();

  std::printf("flashlin %s bench: cpu float32, %d thread%s, op %s (%s), chunk %lld%s\n",
              flashlin_version(), threads, threads == 1 ? "" : "s", op.name, op.description,
              static_cast<long long>(kChunkSize), quick ? ", quick sizes" : "");
  std::printf("times: median of several runs after a warm-up, wall clock\n");
  if (kHaveSgemm)
    std::printf("sgemm baseline: %s, %d thread%s\n", blas_name().c_str(), threads,
                threads == 1 ? "" : "s");
  else
    std::printf("sgemm baseline unavailable (built without OpenBLAS's cblas.h): no %% sgemm\n");
  std::printf("\n");

  // The sgemm baseline first: OpenBLAS's threads keep spinning for a moment after a call, so it
  // gets a pause before flashlin's threads start.
  double sgemm_gflops = 0;
  Row sgemm_row;
  if (kHaveSgemm) {
    sgemm_row = time_sgemm(sgemm_size, large);
    sgemm_gflops = sgemm_row.flops / sgemm_row.seconds * 1e-9;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  Report report(sgemm_gflops, op.name, threads, csv.get());
  if (kHaveSgemm) report.add(sgemm_row);

  {
    Workload work(op, long_shape, /*with_grads=*/true, /*with_state=*/false, 1);
    for (const bool with_backward : {false, true})
      report.add(time_pass(work, "chunked", FLASHLIN_FORM_CHUNKED, with_backward, large));
    for (const bool with_backward : {false, true})
      report.add(time_pass(work, "recurrent", FLASHLIN_FORM_RECURRENT, with_backward, large));
  }
  {
    Workload work(op, parallel_shape, /*with_grads=*/true, /*with_state=*/false, 2);
    for (const bool with_backward : {false, true})
      report.add(time_pass(work, "parallel", FLASHLIN_FORM_PARALLEL, with_backward, large));
  }
  {
    Workload work(op, decode_shape, /*with_grads=*/false, /*with_state=*/true, 3);
    Row row = time_pass(work, "decode", FLASHLIN_FORM_RECURRENT, /*with_backward=*/false, decode);
    row.state_bytes_per_s = 2.0 * static_cast<double>(work.state_bytes()) / row.seconds;
    report.add(row);
    // The floor of a decode step is one read and one write of the state: compare one thread of
    // decode with one thread copying a state-sized buffer (memcpy reads and writes every byte).
    flashlin_set_num_threads(1);
    const Row single = time_pass(work, "decode", FLASHLIN_FORM_RECURRENT, false, decode);
    flashlin_set_num_threads(threads_given ? static_cast<int>(threads_option) : 0);
    std::vector<char> source(work.state_bytes(), 1), target(work.state_bytes(), 0);
    const double copy_seconds =
        median_seconds([&] { std::memcpy(target.data(), source.data(), source.size()); }, decode);
    std::printf(
        "decode vs copy, 1 thread: decode step %.3f ms, memcpy of the state %.3f ms "
        "(%.1f GB/s read+write): decode = %.2fx the copy\n",
        single.seconds * 1e3, copy_seconds * 1e3,
        2.0 * static_cast<double>(source.size()) / copy_seconds * 1e-9,
        single.seconds / copy_seconds);
  }

  std::printf("\n%s", kFlopModel);
  std::printf("total %.1f s\n", now_seconds() - start);
  if (csv) std::printf("csv: %s\n", csv_path.c_str());
  return 0;
}

}  // namespace flashlin_cli
