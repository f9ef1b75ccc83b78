// Based CUDA kernels (src/cuda/based.cu) run on the host, one thread per block (the CUDA runtime
// and device builtins emulated by the headers in this folder), through the C ABI with tensors
// marked as CUDA, against the CPU library (dlopen) on the same data. Checks the kernels' math and
// indexing without a GPU (not races or the memory model). Run: bash
// tests/cuda_emulation/run_based.sh
#include <dlfcn.h>
#include <flashlin/flashlin.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "api/based_params.hpp"
#include "api/error.hpp"

extern "C" int flashlin_has_cuda(void) { return 1; }
uint3_ threadIdx, blockIdx;
dim3 blockDim, gridDim;
float smem[1 << 16];

namespace flashlin::detail {
thread_local std::string g_error;
void set_last_error(std::string m) { g_error = std::move(m); }
const char* last_error_message() { return g_error.c_str(); }
}  // namespace flashlin::detail
namespace flashlin::cpu {
flashlin_status based_forward(const detail::BasedParams&) { std::abort(); }
flashlin_status based_backward(const detail::BasedParams&) { std::abort(); }
}  // namespace flashlin::cpu

using Fwd = flashlin_status (*)(const flashlin_based_config*, const flashlin_based_inputs*,
                                DLTensor*, DLTensor*, const flashlin_execution*);
using Bwd = flashlin_status (*)(const flashlin_based_config*, const flashlin_based_inputs*,
                                const DLTensor*, const DLTensor*, const flashlin_based_grads*,
                                const flashlin_execution*);

struct Buf {
  std::vector<float> data;
  std::vector<int64_t> shape;
  flashlin::TensorView view(bool cuda) {
    return flashlin::TensorView(data.data(), flashlin::DType::kFloat32, shape, {},
                                DLDevice{cuda ? kDLCUDA : kDLCPU, 0});
  }
};

Buf make(std::vector<int64_t> shape, std::mt19937& rng, double scale, double fill = NAN) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  Buf b{std::vector<float>(n), shape};
  std::normal_distribution<float> nd(0, 1);
  for (auto& x : b.data) x = std::isnan(fill) ? scale * nd(rng) : fill;
  return b;
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - b[i]) * double(a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / (den + 1e-30));
}

int failures = 0;
void expect(const char* what, const std::string& name, double err) {
  const bool ok = err < 1e-4;
  if (!ok) ++failures;
  std::printf("%-40s %-16s %.3g %s\n", name.c_str(), what, err, ok ? "" : "FAIL");
}

int main(int argc, char** argv) {
  void* lib = dlopen(argc > 1 ? argv[1] : "build-cpu/libflashlin.so", RTLD_NOW | RTLD_LOCAL);
  if (!lib) return std::printf("dlopen: %s\n", dlerror()), 1;
  Fwd ref_fwd = reinterpret_cast<Fwd>(dlsym(lib, "flashlin_based_forward"));
  Bwd ref_bwd = reinterpret_cast<Bwd>(dlsym(lib, "flashlin_based_backward"));
  struct Case {
    int64_t B, T, H, V;
    std::vector<int64_t> cu;
    int use_norm;
    bool state;
    int form;
  };
  const Case cases[] = {{2, 130, 2, 40, {}, 1, true, 0},
                        {2, 130, 2, 40, {}, 0, true, 0},
                        {1, 74, 3, 33, {0, 0, 1, 71, 74}, 1, true, 1},
                        {2, 1, 1, 8, {}, 0, false, 2},
                        {1, 200, 1, 70, {}, 1, false, 0},
                        {2, 65, 2, 128, {}, 1, true, 0}};
  // (A normalised single token without a state is not a case: its dq is ~1e-6 of the terms that
  // cancel in it, noise in both implementations.)
  std::mt19937 rng(7);
  for (const Case& c : cases) {
    const int64_t d = 16, F = 273, N = c.cu.empty() ? c.B : int64_t(c.cu.size()) - 1;
    std::string name = "B" + std::to_string(c.B) + "_T" + std::to_string(c.T) + "_V" +
                       std::to_string(c.V) + (c.cu.empty() ? "" : "_varlen") +
                       (c.use_norm ? "_norm" : "_raw") + (c.state ? "_state" : "");
    Buf q = make({c.B, c.T, c.H, d}, rng, 1), k = make({c.B, c.T, c.H, d}, rng, 1),
        v = make({c.B, c.T, c.H, c.V}, rng, 1), s0 = make({N, c.H, F, c.V + 1}, rng, 0.3),
        d_o = make({c.B, c.T, c.H, c.V}, rng, 1), dfin = make({N, c.H, F, c.V + 1}, rng, 0.01);
    for (int64_t i = c.V; i < int64_t(s0.data.size()); i += c.V + 1)
      s0.data[i] = 3 + std::fabs(s0.data[i]);
    std::vector<int64_t> cu64 = c.cu;
    flashlin::TensorView cu_view(cu64.data(), flashlin::DType::kInt64, {int64_t(cu64.size())});
    flashlin_based_config config{0.0, c.use_norm, static_cast<flashlin_form>(c.form)};
    std::vector<float> outs[2][6];
    for (int cuda = 0; cuda < 2; ++cuda) {
      Buf o = make({c.B, c.T, c.H, c.V}, rng, 0, NAN),
          fin = make({N, c.H, F, c.V + 1}, rng, 0, NAN);
      Buf dq = make(q.shape, rng, 0, NAN), dk = make(q.shape, rng, 0, NAN),
          dv = make(v.shape, rng, 0, NAN), ds0 = make(s0.shape, rng, 0, NAN);
      auto qv = q.view(cuda), kv = k.view(cuda), vv = v.view(cuda), sv = s0.view(cuda),
           ov = o.view(cuda), fv = fin.view(cuda), dov = d_o.view(cuda), dfv = dfin.view(cuda),
           dqv = dq.view(cuda), dkv = dk.view(cuda), dvv = dv.view(cuda), dsv = ds0.view(cuda);
      flashlin_based_inputs in{qv.get(), kv.get(), vv.get(), c.state ? sv.get() : nullptr,
                               c.cu.empty() ? nullptr : cu_view.get()};
      flashlin_based_grads g{dqv.get(), dkv.get(), dvv.get(), c.state ? dsv.get() : nullptr};
      Fwd fwd = cuda ? flashlin_based_forward : ref_fwd;
      Bwd bwd = cuda ? flashlin_based_backward : ref_bwd;
      if (fwd(&config, &in, ov.get(), fv.get(), nullptr) != FLASHLIN_SUCCESS ||
          bwd(&config, &in, dov.get(), dfv.get(), &g, nullptr) != FLASHLIN_SUCCESS) {
        std::printf("%s: call failed (%s): %s\n", name.c_str(), cuda ? "emul" : "cpu",
                    cuda ? flashlin::detail::last_error_message() : "");
        ++failures;
        continue;
      }
      outs[cuda][0] = o.data, outs[cuda][1] = fin.data, outs[cuda][2] = dq.data;
      outs[cuda][3] = dk.data, outs[cuda][4] = dv.data, outs[cuda][5] = ds0.data;
    }
    const char* names[] = {"o", "final_state", "dq", "dk", "dv", "d_initial_state"};
    for (int i = 0; i < 6; ++i) {
      if (i == 5 && !c.state) continue;
      expect(names[i], name, rel(outs[1][i], outs[0][i]));
    }
    // In place: final_state is initial_state.
    if (c.state) {
      Buf o = make({c.B, c.T, c.H, c.V}, rng, 0, NAN);
      Buf st = s0;
      auto qv = q.view(1), kv = k.view(1), vv = v.view(1), sv = st.view(1), ov = o.view(1);
      flashlin_based_inputs in{qv.get(), kv.get(), vv.get(), sv.get(),
                               c.cu.empty() ? nullptr : cu_view.get()};
      flashlin_based_forward(&config, &in, ov.get(), sv.get(), nullptr);
      expect("in-place state", name, rel(st.data, outs[0][1]));
      expect("in-place o", name, rel(o.data, outs[0][0]));
    }
  }
  std::printf("%d failures\n", failures);
  return failures != 0;
}
