// One small forward pass of the gated linear recurrence on the CPU through the C++ API.
#include <flashlin/flashlin.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const int64_t B = 1, T = 5, H = 2, K = 4, V = 3;
  std::vector<float> q(B * T * H * K), k(q.size()), v(B * T * H * V), g(B * T * H);
  std::vector<float> o(v.size()), state(B * H * K * V);
  for (size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.37f * i), k[i] = std::cos(0.23f * i);
  for (size_t i = 0; i < v.size(); ++i) v[i] = std::sin(0.11f * i + 1.0f);
  for (size_t i = 0; i < g.size(); ++i) g[i] = -0.05f * (1 + i % 4);  // log decays <= 0

  using flashlin::DType;
  flashlin::TensorView tq(q.data(), DType::kFloat32, {B, T, H, K});
  flashlin::TensorView tk(k.data(), DType::kFloat32, {B, T, H, K});
  flashlin::TensorView tv(v.data(), DType::kFloat32, {B, T, H, V});
  flashlin::TensorView tg(g.data(), DType::kFloat32, {B, T, H});
  flashlin::TensorView to(o.data(), DType::kFloat32, {B, T, H, V});
  flashlin::TensorView ts(state.data(), DType::kFloat32, {B, H, K, V});

  flashlin::RecurrenceInputs in;
  in.q = tq.get();
  in.k = tk.get();
  in.v = tv.get();
  in.g = tg.get();
  try {
    flashlin::recurrence_forward(flashlin::RecurrenceConfig().gate(FLASHLIN_GATE_PER_TOKEN), in,
                                 to.get(), ts.get());
  } catch (const flashlin::Error& e) {
    std::fprintf(stderr, "flashlin error (%s): %s\n", flashlin_status_string(e.status()), e.what());
    return 1;
  }

  std::printf("flashlin %s, CUDA backend: %s\n", flashlin::version().c_str(),
              flashlin::has_cuda() ? "yes" : "no");
  bool finite = true;
  for (int64_t t = 0; t < T; ++t) {
    std::printf("o[t=%lld] =", static_cast<long long>(t));
    for (int64_t i = 0; i < H * V; ++i) {
      const float x = o[t * H * V + i];
      finite = finite && std::isfinite(x);
      std::printf(" %+.5f", x);
    }
    std::printf("\n");
  }
  for (float x : state) finite = finite && std::isfinite(x);
  if (!finite) {
    std::fprintf(stderr, "non-finite output\n");
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
