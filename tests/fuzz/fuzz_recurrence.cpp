// libFuzzer target over the C ABI: every entry point of the recurrence (workspace size, forward,
// backward) with fuzzed configs and tensors -- ranks, shapes, strides (zero, negative, huge),
// byte offsets, dtypes, devices, NULL data, aliasing between outputs and inputs, cu_seqlens
// values -- built around small, exactly sized heap buffers so that AddressSanitizer sees any read
// or write outside a tensor. Properties checked beyond "no crash, no hang":
//   * a call that fails leaves a non-empty error message (flashlin_last_error);
//   * no call writes to an input (checksums of every input buffer before and after);
//   * a failed call leaves every output untouched.
// Run with scripts/fuzz.sh (bounded time, committed seed corpus in tests/fuzz/corpus/).
#include <dlpack/dlpack.h>
#include <flashlin/flashlin.h>
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace {

constexpr int64_t kMaxElements = 1 << 14;  // per tensor view (keeps every call fast)

struct Buffer {
  std::unique_ptr<uint8_t[]> bytes;
  size_t size = 0;
  uint64_t checksum() const {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < size; ++i) h = (h ^ bytes[i]) * 1099511628211ull;
    return h;
  }
};

struct FuzzTensor {
  DLTensor tensor{};
  std::vector<int64_t> shape, strides;
  Buffer* buffer = nullptr;
};

class Builder {
 public:
  explicit Builder(FuzzedDataProvider& in) : in_(in) {}

  // A tensor meant to have `shape` (the fuzzer perturbs it); nullptr when the fuzzer says so.
  DLTensor* make(std::vector<int64_t> shape, DLDataType natural, bool allow_null = true) {
    if (allow_null && in_.ConsumeIntegralInRange<int>(0, 9) == 0) return nullptr;
    tensors_.push_back(std::make_unique<FuzzTensor>());
    FuzzTensor& t = *tensors_.back();
    // Shape: usually as meant, sometimes another rank or a changed extent.
    switch (in_.ConsumeIntegralInRange<int>(0, 11)) {
      case 0: shape.push_back(in_.ConsumeIntegralInRange<int64_t>(0, 3)); break;
      case 1:
        if (!shape.empty()) shape.pop_back();
        break;
      case 2:
        if (!shape.empty())
          shape[in_.ConsumeIntegralInRange<size_t>(0, shape.size() - 1)] =
              in_.ConsumeIntegralInRange<int64_t>(-2, 9);
        break;
      default: break;
    }
    t.shape = shape;
    DLDataType dtype = natural;
    if (in_.ConsumeIntegralInRange<int>(0, 7) == 0) {
      static const DLDataType kTypes[] = {{kDLFloat, 16, 1}, {kDLBfloat, 16, 1}, {kDLFloat, 32, 1},
                                          {kDLFloat, 64, 1}, {kDLInt, 32, 1},    {kDLInt, 64, 1},
                                          {kDLFloat, 32, 2}, {kDLFloat, 8, 1},   {kDLUInt, 1, 1}};
      dtype = kTypes[in_.ConsumeIntegralInRange<size_t>(0, 8)];
    }
    const int64_t item = std::max<int64_t>(1, (dtype.bits * dtype.lanes + 7) / 8);
    // Strides: contiguous (NULL or explicit), or fuzzed (zero, negative, large).
    const int ndim = static_cast<int>(shape.size());
    const int stride_mode = in_.ConsumeIntegralInRange<int>(0, 5);
    t.strides.assign(ndim, 0);
    int64_t running = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      t.strides[d] = running;
      running *= std::max<int64_t>(shape[d], 1);
    }
    if (stride_mode >= 4) {
      for (int d = 0; d < ndim; ++d)
        if (in_.ConsumeBool()) t.strides[d] = in_.ConsumeIntegralInRange<int64_t>(-40, 300);
    }
    // Buffer sized exactly for the view (elements reached by non-negative and negative strides).
    int64_t low = 0, high = 0, elements = 1;
    bool empty = false;
    for (int d = 0; d < ndim; ++d) {
      if (shape[d] <= 0) empty = true;
      if (shape[d] > 0) elements *= shape[d];
      const int64_t reach = (std::max<int64_t>(shape[d], 1) - 1) * t.strides[d];
      (reach < 0 ? low : high) += reach;
      if (elements > kMaxElements || high > kMaxElements || -low > kMaxElements) return nullptr;
    }
    const int64_t offset_elems = in_.ConsumeIntegralInRange<int>(0, 15) == 0 ? 1 : 0;
    const size_t bytes = empty ? 0 : static_cast<size_t>((high - low + 1 + offset_elems) * item);
    buffers_.push_back(std::make_unique<Buffer>());
    Buffer& b = *buffers_.back();
    b.size = bytes;
    b.bytes.reset(new uint8_t[bytes + 1]);  // +1: a valid pointer even for 0 bytes
    for (size_t i = 0; i < bytes; ++i)
      b.bytes[i] = static_cast<uint8_t>(in_.ConsumeIntegral<uint8_t>() & 0x3f);
    t.buffer = &b;
    t.tensor.data =
        in_.ConsumeIntegralInRange<int>(0, 30) == 0 ? nullptr : b.bytes.get() - low * item;
    t.tensor.byte_offset = static_cast<uint64_t>(offset_elems * item);
    t.tensor.ndim = ndim;
    t.tensor.dtype = dtype;
    t.tensor.shape = ndim ? t.shape.data() : nullptr;
    t.tensor.strides = stride_mode == 0 ? nullptr : t.strides.data();
    switch (in_.ConsumeIntegralInRange<int>(0, 19)) {
      case 0: t.tensor.device = DLDevice{kDLCUDA, 0}; break;
      case 1: t.tensor.device = DLDevice{kDLCUDAHost, 0}; break;
      case 2:
        t.tensor.device =
            DLDevice{static_cast<DLDeviceType>(in_.ConsumeIntegralInRange<int>(0, 20)), 1};
        break;
      default: t.tensor.device = DLDevice{kDLCPU, 0}; break;
    }
    return &t.tensor;
  }

  // The buffer behind a tensor made here (nullptr for NULL tensors).
  Buffer* buffer_of(const DLTensor* t) const {
    for (const auto& ft : tensors_)
      if (&ft->tensor == t) return ft->buffer;
    return nullptr;
  }

 private:
  FuzzedDataProvider& in_;
  std::vector<std::unique_ptr<FuzzTensor>> tensors_;
  std::vector<std::unique_ptr<Buffer>> buffers_;
};

void require_message(flashlin_status status) {
  if (status == FLASHLIN_SUCCESS) return;
  const char* message = flashlin_last_error();
  if (message == nullptr || message[0] == '\0') __builtin_trap();  // an error without a message
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  Builder make(in);
  const DLDataType f32{kDLFloat, 32, 1}, i32{kDLInt, 32, 1};
  const DLDataType tok =
      in.PickValueInArray({DLDataType{kDLFloat, 32, 1}, DLDataType{kDLFloat, 16, 1},
                           DLDataType{kDLBfloat, 16, 1}, DLDataType{kDLFloat, 64, 1}});
  const int64_t B = in.ConsumeIntegralInRange<int64_t>(0, 3),
                T = in.ConsumeIntegralInRange<int64_t>(0, 40);
  const int64_t H = in.ConsumeIntegralInRange<int64_t>(0, 3),
                K = in.ConsumeIntegralInRange<int64_t>(0, 9);
  const int64_t V = in.ConsumeIntegralInRange<int64_t>(0, 9);

  flashlin_recurrence_config config{};
  int32_t raw_gate = in.ConsumeIntegralInRange<int32_t>(-1, 5);
  std::memcpy(&config.gate_kind, &raw_gate, sizeof raw_gate);
  int32_t raw_form = in.ConsumeIntegralInRange<int32_t>(-1, 4);
  std::memcpy(&config.form, &raw_form, sizeof raw_form);
  config.scale = in.PickValueInArray({0.0, 0.125, -1.0, 1e300, 0.0 / 0.0, 1.0 / 0.0});
  config.chunk_size = in.PickValueInArray({0, 1, 3, 16, 64, 1024, 1025, -7});
  config.reverse = in.ConsumeIntegralInRange<int32_t>(0, 2);
  config.bonus = in.ConsumeIntegralInRange<int32_t>(0, 2);

  // cu_seqlens: sometimes, with fuzzed offsets.
  const DLTensor* cu = nullptr;
  int64_t N = B;
  if (in.ConsumeIntegralInRange<int>(0, 3) == 0) {
    const int64_t count = in.ConsumeIntegralInRange<int64_t>(0, 5);
    DLTensor* c = make.make({count}, i32, false);
    if (c && c->data && c->dtype.code == kDLInt && c->dtype.bits == 32 && c->dtype.lanes == 1 &&
        c->ndim == 1 && c->shape[0] > 0 && (!c->strides || c->strides[0] == 1) &&
        c->byte_offset == 0) {
      int32_t* offsets = static_cast<int32_t*>(c->data);
      int32_t value = 0;
      for (int64_t i = 0; i < c->shape[0]; ++i) {
        offsets[i] = value;
        value += in.ConsumeIntegralInRange<int32_t>(-1, 12);
      }
      if (in.ConsumeBool()) offsets[c->shape[0] - 1] = static_cast<int32_t>(T);
      N = c->shape[0] - 1;
    }
    cu = c;
  }

  flashlin_recurrence_inputs inputs{};
  inputs.q = make.make({B, T, H, K}, tok);
  inputs.k = make.make({B, T, H, K}, tok);
  inputs.v = make.make({B, T, H, V}, tok);
  const int gate = raw_gate;
  inputs.g = gate == 1   ? make.make({H}, f32)
             : gate == 2 ? make.make({B, T, H}, f32)
             : gate == 3 ? make.make({B, T, H, K}, f32)
                         : (in.ConsumeIntegralInRange<int>(0, 7) == 0 ? make.make({B, T, H, K}, f32)
                                                                      : nullptr);
  inputs.u = config.bonus ? make.make({H, K}, f32) : nullptr;
  inputs.initial_state = in.ConsumeBool() ? make.make({N, H, K, V}, f32) : nullptr;
  inputs.cu_seqlens = cu;

  DLTensor* o = make.make({B, T, H, V}, tok);
  DLTensor* final_state = in.ConsumeBool() ? make.make({N, H, K, V}, f32) : nullptr;
  const int alias = in.ConsumeIntegralInRange<int>(0, 9);
  if (alias == 0 && o && inputs.q) o = const_cast<DLTensor*>(inputs.q);  // o aliases q
  if (alias == 1 && final_state && inputs.initial_state)
    final_state = const_cast<DLTensor*>(inputs.initial_state);  // in place
  if (alias == 2 && final_state && o) final_state = o;          // out == out
  const DLTensor* d_o = make.make({B, T, H, V}, tok);
  const DLTensor* d_final = in.ConsumeBool() ? make.make({N, H, K, V}, f32) : nullptr;
  flashlin_recurrence_grads grads{};
  grads.dq = in.ConsumeBool() ? make.make({B, T, H, K}, tok) : nullptr;
  grads.dk = in.ConsumeBool() ? make.make({B, T, H, K}, tok) : nullptr;
  grads.dv = in.ConsumeBool() ? make.make({B, T, H, V}, tok) : nullptr;
  grads.dg =
      inputs.g && in.ConsumeBool()
          ? make.make(std::vector<int64_t>(inputs.g->shape, inputs.g->shape + inputs.g->ndim), f32)
          : nullptr;
  grads.du = inputs.u && in.ConsumeBool() ? make.make({H, K}, f32) : nullptr;
  grads.d_initial_state = in.ConsumeBool() ? make.make({N, H, K, V}, f32) : nullptr;
  if (alias == 3 && grads.dq && inputs.k)
    grads.dq = const_cast<DLTensor*>(inputs.k);                 // dq aliases k
  if (alias == 4 && grads.dq && grads.dk) grads.dk = grads.dq;  // dk == dq

  flashlin_execution exec{};
  const flashlin_execution* exec_ptr = in.ConsumeBool() ? &exec : nullptr;

  // Inputs (not also outputs of the call) must be left as they were.
  auto input_sums = [&](const std::vector<const DLTensor*>& ins,
                        const std::vector<const DLTensor*>& outs) {
    std::vector<uint64_t> sums;
    for (const DLTensor* t : ins) {
      bool is_output = false;
      for (const DLTensor* x : outs) is_output |= x && t && x->data == t->data;
      Buffer* b = make.buffer_of(t);
      sums.push_back(b && !is_output ? b->checksum() : 0);
    }
    return sums;
  };
  const std::vector<const DLTensor*> all_inputs = {
      inputs.q,          inputs.k, inputs.v, inputs.g, inputs.u, inputs.initial_state,
      inputs.cu_seqlens, d_o,      d_final};
  const std::vector<const DLTensor*> fwd_outputs = {o, final_state};
  const std::vector<const DLTensor*> bwd_outputs = {grads.dq, grads.dk, grads.dv,
                                                    grads.dg, grads.du, grads.d_initial_state};
  auto output_sums = [&](const std::vector<const DLTensor*>& outs) {
    std::vector<uint64_t> sums;
    for (const DLTensor* t : outs) {
      Buffer* b = make.buffer_of(t);
      sums.push_back(b ? b->checksum() : 0);
    }
    return sums;
  };

  size_t bytes = 0;
  require_message(flashlin_recurrence_workspace_size(&config, &inputs, in.ConsumeBool(), &bytes));

  auto before = input_sums(all_inputs, fwd_outputs);
  auto outs_before = output_sums(fwd_outputs);
  flashlin_status status = flashlin_recurrence_forward(&config, &inputs, o, final_state, exec_ptr);
  require_message(status);
  if (input_sums(all_inputs, fwd_outputs) != before) __builtin_trap();  // wrote to an input
  if (status != FLASHLIN_SUCCESS && output_sums(fwd_outputs) != outs_before) __builtin_trap();

  before = input_sums(all_inputs, bwd_outputs);
  outs_before = output_sums(bwd_outputs);
  // The exact size query checks what the backward checks: if it rejects, so must the call.
  const flashlin_status query_status =
      flashlin_recurrence_backward_workspace_size(&config, &inputs, d_o, d_final, &grads, &bytes);
  require_message(query_status);
  status = flashlin_recurrence_backward(&config, &inputs, d_o, d_final, &grads, exec_ptr);
  require_message(status);
  if (query_status != FLASHLIN_SUCCESS && status != query_status) __builtin_trap();
  if (input_sums(all_inputs, bwd_outputs) != before) __builtin_trap();
  if (status != FLASHLIN_SUCCESS && output_sums(bwd_outputs) != outs_before) __builtin_trap();
  return 0;
}
