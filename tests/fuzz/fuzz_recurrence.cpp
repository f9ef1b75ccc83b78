// libFuzzer target over the C ABI: every entry point of the recurrence (workspace sizes, forward,
// backward) and of the fused modules (RMSNorm / gated RMSNorm forward, backward and backward
// workspace size; rotary embedding; short convolution forward, backward and backward workspace
// size); the three op families added later, each forward, backward and workspace size: Based
// linear attention, ABC / GSA slot attention and Transformer-VQ attention; and GateLoop's forward
// and backward (complex states: kDLComplex 64 / 128, and dtypes it rejects). The first input
// byte picks the family (family_of); the rest feeds a FuzzedDataProvider (which reads its
// integers from the end, so the recurrence consumes what it always did).
// Fuzzed: configs (enum values out of range; scale, eps, rotary base 0 / negative / NaN / inf /
// huge; chunk sizes; rotary_dim, offset and per-sequence offsets negative or huge; interleaved,
// inverse; kernel widths 0..70; Based's use_norm and form, slot attention's kind and form,
// Transformer-VQ's block_len, GateLoop's form and chunk_size; feature, slot and code counts at and
// past their limits) and tensors -- ranks, shapes, strides (zero, negative, huge), byte offsets,
// dtypes (complex ones of other widths or lanes, real ones for complex states), devices, NULL
// data, cu_seqlens and offsets values, NULL optional arguments, aliasing (the in-place pairs the
// API permits, the same view described another way, shifted views and outputs on inputs or on
// each other, which must be rejected) -- built around small, exactly sized heap buffers so that
// AddressSanitizer sees any read or write outside a tensor.
// Properties checked beyond "no crash, no hang, no sanitizer report":
//   * a call that fails leaves a non-empty error message (flashlin_last_error);
//   * no call writes to an input (checksums of every input buffer before and after);
//   * a failed call leaves every output untouched;
//   * a call that succeeds has no output overlapping an input or another output, except a
//     permitted in-place pair (y / x of RMSNorm and rotary, final_state / initial_state,
//     final_cache / initial_cache, final_hk / hv / z on initial_hk / hv / z) passed as the very
//     same view;
//   * workspace-size queries agree with the calls they size: a query that rejects its arguments
//     makes the call reject them (with the same status and message when the checks before them
//     agree); the recurrence's exact backward query accepts exactly what the backward accepts;
//     and a module query that accepts its arguments makes the backward on them (other arguments
//     valid) run without an argument error, as does a Based / slot / VQ query (which sizes both
//     directions) for the forward and the backward;
//   * GateLoop (no size query): its forward and backward reject a config or input argument with
//     the same status and message, and a call that accepts config and inputs makes the other
//     call on them (other arguments minimal) run without an argument error.
// Run with scripts/fuzz.sh (bounded time, committed seed corpus in tests/fuzz/corpus/). Built with
// -DFLASHLIN_FUZZ_TRACE it prints every call's status (to see what a seed reaches).
#include <dlpack/dlpack.h>
#include <flashlin/flashlin.h>
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kMaxElements = 1 << 14;  // per tensor view (keeps every call fast)
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kInt64Min = std::numeric_limits<int64_t>::min();
constexpr int32_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int32_t kInt32Min = std::numeric_limits<int32_t>::min();
const DLDataType kF32{kDLFloat, 32, 1}, kI32{kDLInt, 32, 1}, kI64{kDLInt, 64, 1};

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

int64_t item_bytes(DLDataType dtype) {
  return std::max<int64_t>(1, (dtype.bits * dtype.lanes + 7) / 8);
}

class Builder {
 public:
  explicit Builder(FuzzedDataProvider& in) : in_(in) {}

  // A tensor meant to have `shape` (the fuzzer perturbs it); nullptr when the fuzzer says so.
  // `slack` extra elements after the view leave room for a shifted second view (view_of).
  DLTensor* make(std::vector<int64_t> shape, DLDataType natural, bool allow_null = true,
                 int64_t slack = 0) {
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
    const int64_t item = item_bytes(dtype);
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
    const size_t bytes =
        empty ? 0 : static_cast<size_t>((high - low + 1 + offset_elems + slack) * item);
    Buffer& b = new_buffer(bytes);
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

  // A second view of the storage of `base` (made here): shifted by `shift` elements (base must
  // have been made with that much slack), or, with shift 0, the same view described another way
  // (explicit strides for NULL ones, other strides for dimensions of size 1).
  DLTensor* view_of(const DLTensor* base, int64_t shift) {
    const FuzzTensor* src = find(base);
    if (!src) return nullptr;
    tensors_.push_back(std::make_unique<FuzzTensor>(*src));
    FuzzTensor& t = *tensors_.back();
    t.tensor.shape = t.shape.empty() ? nullptr : t.shape.data();
    t.tensor.strides = t.strides.empty() ? nullptr : t.strides.data();
    if (shift) {
      if (!src->tensor.strides) t.tensor.strides = nullptr;
      t.tensor.byte_offset += static_cast<uint64_t>(shift * item_bytes(t.tensor.dtype));
    } else if (src->tensor.strides) {
      for (size_t d = 0; d < t.shape.size(); ++d)
        if (t.shape[d] == 1) t.strides[d] = 7;
    }
    return &t.tensor;
  }

  // A fresh, valid, compact tensor shaped, typed and placed as `t` (whose sizes are >= 0).
  DLTensor* like(const DLTensor* t) {
    tensors_.push_back(std::make_unique<FuzzTensor>());
    FuzzTensor& f = *tensors_.back();
    f.shape.assign(t->shape, t->shape + t->ndim);
    int64_t elements = 1;
    for (int64_t s : f.shape) elements *= s;
    Buffer& b = new_buffer(static_cast<size_t>(elements * item_bytes(t->dtype)));
    std::memset(b.bytes.get(), 0, b.size);
    f.buffer = &b;
    f.tensor = *t;
    f.tensor.data = b.bytes.get();
    f.tensor.byte_offset = 0;
    f.tensor.shape = f.shape.empty() ? nullptr : f.shape.data();
    f.tensor.strides = nullptr;
    return &f.tensor;
  }

  // The buffer behind a tensor made here (nullptr for NULL tensors).
  Buffer* buffer_of(const DLTensor* t) const {
    const FuzzTensor* f = find(t);
    return f ? f->buffer : nullptr;
  }

 private:
  const FuzzTensor* find(const DLTensor* t) const {
    for (const auto& ft : tensors_)
      if (t && &ft->tensor == t) return ft.get();
    return nullptr;
  }
  Buffer& new_buffer(size_t bytes) {
    buffers_.push_back(std::make_unique<Buffer>());
    Buffer& b = *buffers_.back();
    b.size = bytes;
    b.bytes.reset(new uint8_t[bytes + 1]);  // +1: a valid pointer even for 0 bytes
    return b;
  }

  FuzzedDataProvider& in_;
  std::vector<std::unique_ptr<FuzzTensor>> tensors_;
  std::vector<std::unique_ptr<Buffer>> buffers_;
};

// --- Property checks
// ------------------------------------------------------------------------------

// What a call returned: its status and its message without the leading "<function>: ".
struct Outcome {
  flashlin_status status = FLASHLIN_SUCCESS;
  std::string message;
  bool ok() const { return status == FLASHLIN_SUCCESS; }
};

bool argument_error(flashlin_status status) {
  return status == FLASHLIN_ERROR_INVALID_ARGUMENT || status == FLASHLIN_ERROR_UNSUPPORTED;
}

// Byte range [first, second) a tensor's elements touch (empty without elements).
std::pair<uintptr_t, uintptr_t> byte_range(const DLTensor& t) {
  int64_t low = 0, high = 0, stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.shape[d] <= 0) return {0, 0};
    const int64_t s = t.strides ? t.strides[d] : stride;
    const int64_t reach = (t.shape[d] - 1) * s;
    (reach < 0 ? low : high) += reach;
    stride *= t.shape[d];
  }
  const int64_t item = item_bytes(t.dtype);
  const uintptr_t base = reinterpret_cast<uintptr_t>(t.data) + t.byte_offset;
  return {base + low * item, base + (high + 1) * item};
}

bool overlap(const DLTensor& a, const DLTensor& b) {
  const auto ra = byte_range(a), rb = byte_range(b);
  return ra.first != ra.second && rb.first != rb.second && ra.first < rb.second &&
         rb.first < ra.second;
}

// The very same view (as the API defines in-place use): data, dtype, shape, and the strides of
// the dimensions of size > 1.
bool same_view(const DLTensor& a, const DLTensor& b) {
  if (reinterpret_cast<uintptr_t>(a.data) + a.byte_offset !=
          reinterpret_cast<uintptr_t>(b.data) + b.byte_offset ||
      a.ndim != b.ndim || a.dtype.code != b.dtype.code || a.dtype.bits != b.dtype.bits ||
      a.dtype.lanes != b.dtype.lanes)
    return false;
  int64_t sa = 1, sb = 1;
  for (int d = a.ndim - 1; d >= 0; --d) {
    if (a.shape[d] != b.shape[d]) return false;
    const int64_t xa = a.strides ? a.strides[d] : sa, xb = b.strides ? b.strides[d] : sb;
    if (a.shape[d] > 1 && xa != xb) return false;
    sa *= a.shape[d];
    sb *= b.shape[d];
  }
  return true;
}

// One call's tensors: what it reads, what it writes, and which (output, input) pairs it may
// update in place.
struct CallTensors {
  const char* name;
  std::vector<const DLTensor*> inputs, outputs;
  std::vector<std::pair<const DLTensor*, const DLTensor*>> in_place;
};

// Runs `call` and checks the properties of the header comment that one call has.
template <typename Call>
Outcome checked(const Builder& make, const CallTensors& c, Call&& call) {
  auto sums = [&](const std::vector<const DLTensor*>& tensors, bool skip_outputs) {
    std::vector<uint64_t> out;
    for (const DLTensor* t : tensors) {
      Buffer* b = make.buffer_of(t);
      bool shared = false;  // an input whose storage an output also has (in place, or a view)
      for (const DLTensor* o : c.outputs) shared |= skip_outputs && b && b == make.buffer_of(o);
      out.push_back(b && !shared ? b->checksum() : 0);
    }
    return out;
  };
  const std::vector<uint64_t> ins_before = sums(c.inputs, true),
                              outs_before = sums(c.outputs, false);
  Outcome result;
  result.status = call();
#ifdef FLASHLIN_FUZZ_TRACE
  std::fprintf(stderr, "%s -> %d %s\n", c.name, static_cast<int>(result.status),
               result.status ? flashlin_last_error() : "");
#endif
  if (!result.ok()) {
    const char* message = flashlin_last_error();
    if (message == nullptr || message[0] == '\0') __builtin_trap();  // an error without a message
    const char* rest = std::strstr(message, ": ");
    result.message = rest ? rest + 2 : message;
  }
  if (sums(c.inputs, true) != ins_before) __builtin_trap();  // wrote to an input
  if (!result.ok() && sums(c.outputs, false) != outs_before)
    __builtin_trap();  // wrote, then failed
  if (result.ok()) {
    // Accepted: no output overlaps another tensor of the call, bar a permitted in-place pair.
    for (size_t i = 0; i < c.outputs.size(); ++i) {
      const DLTensor* o = c.outputs[i];
      if (!o) continue;
      for (size_t j = 0; j < c.outputs.size(); ++j)
        if (j != i && c.outputs[j] && overlap(*o, *c.outputs[j])) __builtin_trap();
      for (const DLTensor* t : c.inputs) {
        if (!t || !overlap(*o, *t)) continue;
        bool permitted = false;
        for (const auto& [out, in] : c.in_place) permitted |= out == o && in == t;
        if (!permitted || !same_view(*o, *t)) __builtin_trap();
      }
    }
  }
  return result;
}

// A size query and the call it sizes: a query that rejects its arguments makes the call reject
// them; with the same status and message when the call checks nothing else first.
void require_agreement(const Outcome& query, const Outcome& call, bool same_first_checks) {
  if (query.ok()) return;
  if (call.ok()) __builtin_trap();
  if (same_first_checks && (call.status != query.status || call.message != query.message))
    __builtin_trap();
}

// --- Shared fuzzed pieces
// -------------------------------------------------------------------------

DLDataType pick_float(FuzzedDataProvider& in) {
  return in.PickValueInArray({DLDataType{kDLFloat, 32, 1}, DLDataType{kDLFloat, 16, 1},
                              DLDataType{kDLBfloat, 16, 1}, DLDataType{kDLFloat, 64, 1}});
}

// A raw value for a C enum field: usually a valid one, else a neighbour or an int extreme.
template <typename Enum>
int32_t set_enum(FuzzedDataProvider& in, Enum& field, int32_t max_valid) {
  int32_t raw = in.ConsumeIntegralInRange<int32_t>(0, max_valid);
  if (in.ConsumeIntegralInRange<int>(0, 3) == 3)
    raw = in.PickValueInArray({-1, max_valid + 1, max_valid + 2, kInt32Min, kInt32Max});
  static_assert(sizeof(Enum) == sizeof(int32_t), "enum fields are int-sized");
  std::memcpy(&field, &raw, sizeof raw);
  return raw;
}

int64_t integer_at(const DLTensor& t, int64_t i) {
  const int64_t stride = t.strides ? t.strides[0] : 1;
  const char* p =
      static_cast<const char*>(t.data) + t.byte_offset + i * stride * (t.dtype.bits / 8);
  if (t.dtype.bits == 32) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
  }
  int64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Writes next(i) into element i of a rank-1 int32/int64 tensor made by the Builder, when the
// fuzzer left it one (with data and elements); returns whether it did.
bool fill_integers(DLTensor* t, const std::function<int64_t(int64_t)>& next) {
  if (!t || !t->data || t->ndim != 1 || t->shape[0] <= 0 || t->dtype.code != kDLInt ||
      t->dtype.lanes != 1 || (t->dtype.bits != 32 && t->dtype.bits != 64))
    return false;
  const int64_t stride = t->strides ? t->strides[0] : 1, item = t->dtype.bits / 8;
  for (int64_t i = 0; i < t->shape[0]; ++i) {
    char* p = static_cast<char*>(t->data) + t->byte_offset + i * stride * item;
    const int64_t value = next(i);
    if (item == 4) {
      const int32_t v = static_cast<int32_t>(value);
      std::memcpy(p, &v, 4);
    } else {
      std::memcpy(p, &value, 8);
    }
  }
  return true;
}

// cu_seqlens [N + 1] for T tokens, with fuzzed offsets (usually non-decreasing, usually ending
// at T); *num_seqs becomes N when the tensor came out well formed enough to count.
const DLTensor* make_cu_seqlens(FuzzedDataProvider& in, Builder& make, int64_t T,
                                DLDataType natural, int64_t* num_seqs) {
  const int64_t count = in.ConsumeIntegralInRange<int64_t>(0, 5);
  DLTensor* c = make.make({count}, natural, false);
  int64_t value = 0;
  if (fill_integers(c, [&](int64_t) {
        const int64_t v = value;
        value += in.ConsumeIntegralInRange<int32_t>(-1, 12);
        return v;
      })) {
    if (in.ConsumeBool())
      fill_integers(c, [&](int64_t i) { return i + 1 == c->shape[0] ? T : integer_at(*c, i); });
    *num_seqs = c->shape[0] - 1;
  }
  return c;
}

const flashlin_execution* pick_exec(FuzzedDataProvider& in, flashlin_execution& exec) {
  static uint8_t scratch[64];
  exec = flashlin_execution{};
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: return nullptr;
    case 1: return &exec;
    case 2:  // caller-owned scratch (the CPU takes none)
      exec.workspace = scratch;
      exec.workspace_bytes = sizeof scratch;
      return &exec;
    default:  // a stream and a size the CPU ignores
      exec.stream = reinterpret_cast<void*>(uintptr_t{1});
      exec.workspace_bytes = std::numeric_limits<size_t>::max();
      return &exec;
  }
}

// A rare NULL for a required struct pointer.
template <typename T>
T* or_null(FuzzedDataProvider& in, T* p) {
  return in.ConsumeIntegralInRange<int>(0, 31) == 31 ? nullptr : p;  // not when input runs out
}

// --- Recurrence
// -----------------------------------------------------------------------------------

void fuzz_recurrence(FuzzedDataProvider& in, Builder& make) {
  const DLDataType f32 = kF32;
  const DLDataType tok = pick_float(in);
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
  config.scale = in.PickValueInArray({0.0, 0.125, -1.0, 1e300, kNaN, kInf});
  config.chunk_size = in.PickValueInArray({0, 1, 3, 16, 64, 1024, 1025, -7});
  config.reverse = in.ConsumeIntegralInRange<int32_t>(0, 2);
  config.bonus = in.ConsumeIntegralInRange<int32_t>(0, 2);

  // cu_seqlens: sometimes, with fuzzed offsets.
  int64_t N = B;
  const DLTensor* cu =
      in.ConsumeIntegralInRange<int>(0, 3) == 0 ? make_cu_seqlens(in, make, T, kI32, &N) : nullptr;

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

  const std::vector<const DLTensor*> common = {
      inputs.q, inputs.k, inputs.v, inputs.g, inputs.u, inputs.initial_state, cu};
  std::vector<const DLTensor*> bwd_inputs = common;
  bwd_inputs.push_back(d_o);
  bwd_inputs.push_back(d_final);
  const std::vector<const DLTensor*> bwd_outputs = {grads.dq, grads.dg, grads.dk,
                                                    grads.dv, grads.du, grads.d_initial_state};

  size_t bytes = 0;
  const int backward_flag = in.ConsumeBool();
  const Outcome size = checked(make, {"flashlin_recurrence_workspace_size", common, {}, {}}, [&] {
    return flashlin_recurrence_workspace_size(&config, &inputs, backward_flag, &bytes);
  });
  const Outcome forward = checked(
      make,
      {"flashlin_recurrence_forward",
       common,
       {o, final_state},
       {{final_state, inputs.initial_state}}},
      [&] { return flashlin_recurrence_forward(&config, &inputs, o, final_state, exec_ptr); });
  // Every check of the size query comes first in the calls.
  require_agreement(size, forward, true);

  // The exact backward query checks what the backward checks: they accept and reject alike.
  const Outcome query =
      checked(make, {"flashlin_recurrence_backward_workspace_size", bwd_inputs, {}, {}}, [&] {
        return flashlin_recurrence_backward_workspace_size(&config, &inputs, d_o, d_final, &grads,
                                                           &bytes);
      });
  const Outcome backward =
      checked(make, {"flashlin_recurrence_backward", bwd_inputs, bwd_outputs, {}}, [&] {
        return flashlin_recurrence_backward(&config, &inputs, d_o, d_final, &grads, exec_ptr);
      });
  require_agreement(size, query, true);
  require_agreement(query, backward, true);
  if (query.ok() && argument_error(backward.status)) __builtin_trap();
}

// --- RMSNorm
// --------------------------------------------------------------------------------------

void fuzz_rms_norm(FuzzedDataProvider& in, Builder& make) {
  const DLDataType tok = pick_float(in), param = pick_float(in);
  const int alias = in.ConsumeIntegralInRange<int>(0, 11);
  const int64_t shift = in.ConsumeIntegralInRange<int64_t>(1, 3);
  const int rank = in.ConsumeIntegralInRange<int>(1, 4);
  std::vector<int64_t> shape;
  for (int i = 0; i + 1 < rank; ++i) shape.push_back(in.ConsumeIntegralInRange<int64_t>(0, 4));
  const int64_t D = in.ConsumeIntegralInRange<int64_t>(0, 70);
  shape.push_back(D);

  flashlin_rms_norm_config config{};
  config.eps = in.PickValueInArray(
      {0.0, 1e-5, 1e-6, 1.0, -0.0, -1e-5, kNaN, kInf, -kInf, 1e300, 4.9e-324, 1e-300});
  const int32_t gate_kind = set_enum(in, config.gate, 2);
  const flashlin_rms_norm_config* config_ptr = or_null(in, &config);
  const bool config_valid = config_ptr && gate_kind >= 0 && gate_kind <= 2 && config.eps >= 0 &&
                            std::isfinite(config.eps);

  const DLTensor* x = make.make(shape, tok, true, alias == 1 ? shift : 0);
  const DLTensor* weight = in.ConsumeBool() ? make.make({D}, param) : nullptr;
  const DLTensor* bias = in.ConsumeBool() ? make.make({D}, param) : nullptr;
  const DLDataType gate_dtype = in.ConsumeBool() ? tok : pick_float(in);
  const DLTensor* gate =
      (gate_kind == 1 || gate_kind == 2 || in.ConsumeIntegralInRange<int>(0, 7) == 0)
          ? make.make(shape, gate_dtype)
          : nullptr;
  DLTensor* y = make.make(shape, tok);
  switch (alias) {
    case 0: y = const_cast<DLTensor*>(x); break;  // in place
    case 1: y = make.view_of(x, shift); break;    // overlaps x, shifted: rejected
    case 2: y = make.view_of(x, 0); break;        // in place, the view described another way
    case 3: y = const_cast<DLTensor*>(gate); break;
    case 4: y = const_cast<DLTensor*>(weight); break;
    default: break;
  }
  flashlin_execution exec_storage;
  const flashlin_execution* exec = pick_exec(in, exec_storage);
  checked(make, {"flashlin_rms_norm_forward", {x, weight, bias, gate}, {y}, {{y, x}}},
          [&] { return flashlin_rms_norm_forward(config_ptr, x, weight, bias, gate, y, exec); });

  const DLTensor* dy = make.make(shape, tok);
  DLTensor* dx = in.ConsumeBool() ? make.make(shape, tok) : nullptr;
  DLTensor* dweight = in.ConsumeBool() ? make.make({D}, param) : nullptr;
  DLTensor* dbias = in.ConsumeBool() ? make.make({D}, param) : nullptr;
  DLTensor* dgate = in.ConsumeBool() ? make.make(shape, gate_dtype) : nullptr;
  switch (in.ConsumeIntegralInRange<int>(0, 11)) {  // overlaps the backward must reject
    case 0: dx = const_cast<DLTensor*>(x); break;
    case 1: dx = const_cast<DLTensor*>(dy); break;
    case 2: dbias = dweight; break;
    case 3: dgate = dx; break;
    case 4: dweight = const_cast<DLTensor*>(weight); break;
    case 5: dgate = const_cast<DLTensor*>(gate); break;
    default: break;
  }
  size_t bytes = 0;
  size_t* bytes_ptr = or_null(in, &bytes);
  const Outcome query =
      checked(make, {"flashlin_rms_norm_backward_workspace_size", {x}, {}, {}},
              [&] { return flashlin_rms_norm_backward_workspace_size(x, bytes_ptr); });
  const Outcome backward = checked(
      make,
      {"flashlin_rms_norm_backward", {x, weight, bias, gate, dy}, {dx, dweight, dbias, dgate}, {}},
      [&] {
        return flashlin_rms_norm_backward(config_ptr, x, weight, bias, gate, dy, dx, dweight, dbias,
                                          dgate, exec);
      });
  if (!bytes_ptr) return;
  require_agreement(query, backward, config_valid);
  if (query.ok() && argument_error(backward.status)) {
    // The query accepted x: the backward on it, everything else valid, must accept it too.
    const flashlin_rms_norm_config plain{};
    const DLTensor* plain_dy = make.like(x);
    const Outcome minimal =
        checked(make, {"flashlin_rms_norm_backward", {x, plain_dy}, {}, {}}, [&] {
          return flashlin_rms_norm_backward(&plain, x, nullptr, nullptr, nullptr, plain_dy, nullptr,
                                            nullptr, nullptr, nullptr, nullptr);
        });
    if (argument_error(minimal.status)) __builtin_trap();
  }
}

// --- Rotary embedding
// -----------------------------------------------------------------------------

void fuzz_rotary(FuzzedDataProvider& in, Builder& make) {
  const DLDataType tok = pick_float(in);
  const int alias = in.ConsumeIntegralInRange<int>(0, 11);
  const int64_t shift = in.ConsumeIntegralInRange<int64_t>(1, 3);
  const int64_t B = in.ConsumeIntegralInRange<int64_t>(0, 3),
                T = in.ConsumeIntegralInRange<int64_t>(0, 24);
  const int64_t H = in.ConsumeIntegralInRange<int64_t>(0, 3),
                D = in.ConsumeIntegralInRange<int64_t>(0, 70);

  flashlin_rotary_config config{};
  config.base = in.PickValueInArray(
      {0.0, 10000.0, 500000.0, 1.0, 2.0, 0.5, 1e-300, 4.9e-324, 1e300, -1.0, -0.0, kNaN, kInf});
  const int32_t d32 = static_cast<int32_t>(D);
  config.rotary_dim =
      in.ConsumeBool()
          ? in.PickValueInArray({0, d32, d32 - 1, d32 - 2, d32 + 2, 2, 1, -2, kInt32Max, kInt32Min})
          : in.ConsumeIntegralInRange<int32_t>(-4, 80);
  config.interleaved = in.PickValueInArray({0, 1, -1, 2});
  config.inverse = in.PickValueInArray({0, 1, -1, kInt32Min});
  config.offset =
      in.ConsumeBool()
          ? in.PickValueInArray({int64_t{0}, int64_t{1}, int64_t{4096}, int64_t{-1}, kInt64Min,
                                 kInt64Max, kInt64Max - T, kInt64Max - T + (T > 0),
                                 int64_t{1} << 53, int64_t{1} << 62})
          : in.ConsumeIntegralInRange<int64_t>(0, 100000);
  const flashlin_rotary_config* config_ptr = or_null(in, &config);

  int64_t N = B;
  const DLTensor* cu = in.ConsumeIntegralInRange<int>(0, 3) == 0
                           ? make_cu_seqlens(in, make, T, in.ConsumeBool() ? kI32 : kI64, &N)
                           : nullptr;
  DLTensor* offsets = nullptr;
  if (in.ConsumeIntegralInRange<int>(0, 2) == 0) {
    offsets = make.make({N}, in.ConsumeBool() ? kI32 : kI64);
    fill_integers(offsets, [&](int64_t) {
      return in.ConsumeBool()
                 ? in.ConsumeIntegralInRange<int64_t>(0, 5000)
                 : in.PickValueInArray({int64_t{-1}, kInt64Max, kInt64Max - T, kInt64Min,
                                        int64_t{kInt32Max}, int64_t{kInt32Min}, int64_t{1} << 62});
    });
  }
  const DLTensor* x = make.make({B, T, H, D}, tok, true, alias == 1 ? shift : 0);
  DLTensor* y = make.make({B, T, H, D}, tok);
  switch (alias) {
    case 0: y = const_cast<DLTensor*>(x); break;  // in place
    case 1: y = make.view_of(x, shift); break;    // overlaps x, shifted: rejected
    case 2: y = make.view_of(x, 0); break;        // in place, the view described another way
    case 3: y = offsets; break;
    case 4: y = const_cast<DLTensor*>(cu); break;
    default: break;
  }
  flashlin_execution exec_storage;
  const flashlin_execution* exec = pick_exec(in, exec_storage);
  checked(make, {"flashlin_rotary", {x, offsets, cu}, {y}, {{y, x}}},
          [&] { return flashlin_rotary(config_ptr, x, offsets, cu, y, exec); });
}

// --- Short convolution
// ----------------------------------------------------------------------------

void fuzz_short_conv(FuzzedDataProvider& in, Builder& make) {
  const DLDataType tok = pick_float(in), param = pick_float(in);
  const int alias = in.ConsumeIntegralInRange<int>(0, 15);
  const int64_t shift = in.ConsumeIntegralInRange<int64_t>(1, 3);
  const int64_t B = in.ConsumeIntegralInRange<int64_t>(0, 3),
                T = in.ConsumeIntegralInRange<int64_t>(0, 40);
  const int64_t D = in.ConsumeIntegralInRange<int64_t>(0, 16),
                W = in.ConsumeIntegralInRange<int64_t>(0, 70);

  flashlin_short_conv_config config{};
  const int32_t activation = set_enum(in, config.activation, 1);
  const flashlin_short_conv_config* config_ptr = or_null(in, &config);
  const bool config_valid = config_ptr && activation >= 0 && activation <= 1;

  int64_t N = B;
  flashlin_short_conv_inputs inputs{};
  inputs.cu_seqlens = in.ConsumeIntegralInRange<int>(0, 3) == 0
                          ? make_cu_seqlens(in, make, T, in.ConsumeBool() ? kI32 : kI64, &N)
                          : nullptr;
  inputs.x = make.make({B, T, D}, tok, true, alias == 1 ? shift : 0);
  inputs.weight = make.make({D, W}, param);
  inputs.bias = in.ConsumeBool() ? make.make({D}, param) : nullptr;
  inputs.initial_cache =
      in.ConsumeBool() ? make.make({N, D, W}, param, true, alias == 3 ? shift : 0) : nullptr;
  const flashlin_short_conv_inputs* inputs_ptr = or_null(in, &inputs);

  DLTensor* y = make.make({B, T, D}, tok);
  DLTensor* final_cache = in.ConsumeBool() ? make.make({N, D, W}, param) : nullptr;
  switch (alias) {
    case 0: y = const_cast<DLTensor*>(inputs.x); break;  // no in-place convolution: rejected
    case 1: y = make.view_of(inputs.x, shift); break;
    case 2: final_cache = const_cast<DLTensor*>(inputs.initial_cache); break;  // in place
    case 3: final_cache = make.view_of(inputs.initial_cache, shift); break;
    case 4: final_cache = make.view_of(inputs.initial_cache, 0); break;  // in place, described anew
    case 5: final_cache = y; break;
    case 6: y = const_cast<DLTensor*>(inputs.weight); break;
    case 7: final_cache = const_cast<DLTensor*>(inputs.cu_seqlens); break;
    default: break;
  }
  const std::vector<const DLTensor*> ins = {inputs.x, inputs.weight, inputs.bias,
                                            inputs.initial_cache, inputs.cu_seqlens};
  flashlin_execution exec_storage;
  const flashlin_execution* exec = pick_exec(in, exec_storage);
  checked(
      make,
      {"flashlin_short_conv_forward", ins, {y, final_cache}, {{final_cache, inputs.initial_cache}}},
      [&] { return flashlin_short_conv_forward(config_ptr, inputs_ptr, y, final_cache, exec); });

  const DLTensor* dy = make.make({B, T, D}, tok);
  const DLTensor* d_final_cache = in.ConsumeBool() ? make.make({N, D, W}, param) : nullptr;
  flashlin_short_conv_grads grads{};
  grads.dx = in.ConsumeBool() ? make.make({B, T, D}, tok) : nullptr;
  grads.dweight = in.ConsumeBool() ? make.make({D, W}, param) : nullptr;
  grads.dbias = in.ConsumeBool() ? make.make({D}, param) : nullptr;
  grads.d_initial_cache = in.ConsumeBool() ? make.make({N, D, W}, param) : nullptr;
  switch (in.ConsumeIntegralInRange<int>(0, 11)) {  // overlaps the backward must reject
    case 0: grads.dx = const_cast<DLTensor*>(dy); break;
    case 1: grads.dx = const_cast<DLTensor*>(inputs.x); break;
    case 2: grads.d_initial_cache = const_cast<DLTensor*>(d_final_cache); break;
    case 3: grads.d_initial_cache = const_cast<DLTensor*>(inputs.initial_cache); break;
    case 4: grads.dweight = const_cast<DLTensor*>(inputs.weight); break;
    case 5: grads.dbias = const_cast<DLTensor*>(inputs.bias); break;
    case 6: grads.dx = make.view_of(inputs.x, 0); break;
    default: break;
  }
  const flashlin_short_conv_grads* grads_ptr = or_null(in, &grads);
  std::vector<const DLTensor*> bwd_ins = ins;
  bwd_ins.push_back(dy);
  bwd_ins.push_back(d_final_cache);
  size_t bytes = 0;
  size_t* bytes_ptr = or_null(in, &bytes);
  const Outcome query =
      checked(make, {"flashlin_short_conv_backward_workspace_size", ins, {}, {}},
              [&] { return flashlin_short_conv_backward_workspace_size(inputs_ptr, bytes_ptr); });
  const Outcome backward =
      checked(make,
              {"flashlin_short_conv_backward",
               bwd_ins,
               {grads.dx, grads.dweight, grads.dbias, grads.d_initial_cache},
               {}},
              [&] {
                return flashlin_short_conv_backward(config_ptr, inputs_ptr, dy, d_final_cache,
                                                    grads_ptr, exec);
              });
  if (!bytes_ptr) return;
  require_agreement(query, backward, config_valid);
  if (query.ok() && argument_error(backward.status)) {
    // The query accepted the inputs: the backward on them, everything else valid, must too.
    const flashlin_short_conv_config plain{};
    const flashlin_short_conv_grads none{};
    const DLTensor* plain_dy = make.like(inputs.x);
    std::vector<const DLTensor*> minimal_ins = ins;
    minimal_ins.push_back(plain_dy);
    const Outcome minimal =
        checked(make, {"flashlin_short_conv_backward", minimal_ins, {}, {}}, [&] {
          return flashlin_short_conv_backward(&plain, &inputs, plain_dy, nullptr, &none, nullptr);
        });
    if (argument_error(minimal.status)) __builtin_trap();
  }
}

// --- Shared by the newer op families
// -------------------------------------------------------------

// A config scale: usually valid (0 = default, finite), sometimes NaN / inf (rejected).
double pick_scale(FuzzedDataProvider& in) {
  return in.PickValueInArray(
      {0.0, 0.0, 0.125, 1.0, -1.0, 0.5, 4.9e-324, 1e300, -0.0, kNaN, kInf, -kInf});
}

// A small fuzzed size, sometimes one of `edges` (limits of the op and just past them).
int64_t pick_size(FuzzedDataProvider& in, int64_t max_small, std::initializer_list<int64_t> edges) {
  if (in.ConsumeIntegralInRange<int>(0, 7) != 0)
    return in.ConsumeIntegralInRange<int64_t>(0, max_small);
  const std::vector<int64_t> e(edges);
  return e[in.ConsumeIntegralInRange<size_t>(0, e.size() - 1)];
}

// The backward flag of a size query: usually 0 or 1, sometimes another int.
int pick_backward_flag(FuzzedDataProvider& in) {
  return in.ConsumeIntegralInRange<int>(0, 5) == 0 ? in.PickValueInArray({2, -1, kInt32Min})
                                                   : in.ConsumeIntegralInRange<int>(0, 1);
}

// --- Based linear attention
// -----------------------------------------------------------------------

void fuzz_based(FuzzedDataProvider& in, Builder& make) {
  const DLDataType tok = pick_float(in);
  const DLDataType state_type = in.ConsumeBool() ? kF32 : pick_float(in);
  const int alias = in.ConsumeIntegralInRange<int>(0, 15);
  const int64_t shift = in.ConsumeIntegralInRange<int64_t>(1, 3);
  const int64_t B = in.ConsumeIntegralInRange<int64_t>(0, 3),
                T = in.ConsumeIntegralInRange<int64_t>(0, 70);
  const int64_t H = in.ConsumeIntegralInRange<int64_t>(0, 3);
  const int64_t d = pick_size(in, 6, {0, 1, 16, 31, 32, 33});  // 1..32 on the CPU
  const int64_t V = pick_size(in, 9, {0, 1, 255, 256, 257});   // 1..256
  const int64_t F = 1 + d + d * d;

  flashlin_based_config config{};
  config.scale = pick_scale(in);
  config.use_norm = in.PickValueInArray({1, 1, 0, -1, 2, kInt32Min});
  set_enum(in, config.form, 2);
  const flashlin_based_config* config_ptr = or_null(in, &config);

  int64_t N = B;
  flashlin_based_inputs inputs{};
  inputs.cu_seqlens = in.ConsumeIntegralInRange<int>(0, 3) == 0
                          ? make_cu_seqlens(in, make, T, in.ConsumeBool() ? kI32 : kI64, &N)
                          : nullptr;
  inputs.q = make.make({B, T, H, d}, tok);
  inputs.k = make.make({B, T, H, d}, tok);
  inputs.v = make.make({B, T, H, V}, tok, true, alias == 1 ? shift : 0);
  inputs.initial_state = in.ConsumeBool()
                             ? make.make({N, H, F, V + 1}, state_type, true, alias == 3 ? shift : 0)
                             : nullptr;
  const flashlin_based_inputs* inputs_ptr = or_null(in, &inputs);

  DLTensor* o = make.make({B, T, H, V}, tok);
  DLTensor* final_state = in.ConsumeBool() ? make.make({N, H, F, V + 1}, state_type) : nullptr;
  switch (alias) {
    case 0: o = const_cast<DLTensor*>(inputs.q); break;  // o aliases q: rejected
    case 1: o = make.view_of(inputs.v, shift); break;    // overlaps v, shifted
    case 2: final_state = const_cast<DLTensor*>(inputs.initial_state); break;  // in place
    case 3: final_state = make.view_of(inputs.initial_state, shift); break;
    case 4: final_state = make.view_of(inputs.initial_state, 0); break;  // in place, described anew
    case 5: final_state = o; break;
    case 6: o = const_cast<DLTensor*>(inputs.cu_seqlens); break;
    case 7: o = const_cast<DLTensor*>(inputs.v); break;  // no in-place attention: rejected
    default: break;
  }
  const std::vector<const DLTensor*> ins = {inputs.q, inputs.k, inputs.v, inputs.initial_state,
                                            inputs.cu_seqlens};
  flashlin_execution exec_storage;
  const flashlin_execution* exec = pick_exec(in, exec_storage);

  size_t bytes = 0;
  size_t* bytes_ptr = or_null(in, &bytes);
  const int backward_flag = pick_backward_flag(in);
  const Outcome size = checked(make, {"flashlin_based_workspace_size", ins, {}, {}}, [&] {
    return flashlin_based_workspace_size(config_ptr, inputs_ptr, backward_flag, bytes_ptr);
  });
  const Outcome forward = checked(
      make,
      {"flashlin_based_forward", ins, {o, final_state}, {{final_state, inputs.initial_state}}},
      [&] { return flashlin_based_forward(config_ptr, inputs_ptr, o, final_state, exec); });

  const DLTensor* d_o = make.make({B, T, H, V}, tok);
  const DLTensor* d_final = in.ConsumeBool() ? make.make({N, H, F, V + 1}, state_type) : nullptr;
  flashlin_based_grads grads{};
  grads.dq = in.ConsumeBool() ? make.make({B, T, H, d}, tok) : nullptr;
  grads.dk = in.ConsumeBool() ? make.make({B, T, H, d}, tok) : nullptr;
  grads.dv = in.ConsumeBool() ? make.make({B, T, H, V}, tok) : nullptr;
  grads.d_initial_state = in.ConsumeBool() ? make.make({N, H, F, V + 1}, state_type) : nullptr;
  switch (in.ConsumeIntegralInRange<int>(0, 11)) {  // overlaps the backward must reject
    case 0: grads.dq = const_cast<DLTensor*>(inputs.q); break;
    case 1: grads.dk = grads.dq; break;
    case 2: grads.dv = const_cast<DLTensor*>(d_o); break;
    case 3: grads.d_initial_state = const_cast<DLTensor*>(inputs.initial_state); break;
    case 4: grads.d_initial_state = const_cast<DLTensor*>(d_final); break;
    case 5: grads.dk = make.view_of(inputs.k, 0); break;
    default: break;
  }
  const flashlin_based_grads* grads_ptr = or_null(in, &grads);
  std::vector<const DLTensor*> bwd_ins = ins;
  bwd_ins.push_back(d_o);
  bwd_ins.push_back(d_final);
  const Outcome backward = checked(make,
                                   {"flashlin_based_backward",
                                    bwd_ins,
                                    {grads.dq, grads.dk, grads.dv, grads.d_initial_state},
                                    {}},
                                   [&] {
                                     return flashlin_based_backward(config_ptr, inputs_ptr, d_o,
                                                                    d_final, grads_ptr, exec);
                                   });
  if (!bytes_ptr) return;
  // The query checks what both calls check first (config and inputs), nothing else.
  require_agreement(size, forward, true);
  require_agreement(size, backward, true);
  if (size.ok() && (argument_error(forward.status) || argument_error(backward.status))) {
    // The query accepted the inputs: both calls on them, everything else valid, must too.
    const DLTensor* plain_o = make.like(inputs.v);
    const Outcome f = checked(make, {"flashlin_based_forward", ins, {plain_o}, {}}, [&] {
      return flashlin_based_forward(config_ptr, inputs_ptr, const_cast<DLTensor*>(plain_o), nullptr,
                                    nullptr);
    });
    if (argument_error(f.status)) __builtin_trap();
    const flashlin_based_grads none{};
    const DLTensor* plain_do = make.like(inputs.v);
    std::vector<const DLTensor*> minimal_ins = ins;
    minimal_ins.push_back(plain_do);
    const Outcome b = checked(make, {"flashlin_based_backward", minimal_ins, {}, {}}, [&] {
      return flashlin_based_backward(config_ptr, inputs_ptr, plain_do, nullptr, &none, nullptr);
    });
    if (argument_error(b.status)) __builtin_trap();
  }
}

// --- ABC / GSA slot attention
// ---------------------------------------------------------------------

void fuzz_slot_attention(FuzzedDataProvider& in, Builder& make) {
  const DLDataType tok = pick_float(in), slot_type = pick_float(in);
  const DLDataType state_type = in.ConsumeBool() ? kF32 : pick_float(in);
  const int alias = in.ConsumeIntegralInRange<int>(0, 15);
  const int64_t shift = in.ConsumeIntegralInRange<int64_t>(1, 3);
  const int64_t B = in.ConsumeIntegralInRange<int64_t>(0, 3),
                T = in.ConsumeIntegralInRange<int64_t>(0, 70);
  const int64_t H = in.ConsumeIntegralInRange<int64_t>(0, 3);
  const int64_t K = pick_size(in, 9, {0, 1, 4096, 4097});    // 1..4096
  const int64_t V = pick_size(in, 9, {0, 1, 4096, 4097});    // 1..4096
  const int64_t M = pick_size(in, 9, {0, 1, 64, 256, 257});  // 1..256 slots

  flashlin_slot_attention_config config{};
  const int32_t kind = set_enum(in, config.kind, 1);
  set_enum(in, config.form, 1);  // 2 (parallel) is one of the invalid values
  config.scale = pick_scale(in);
  const flashlin_slot_attention_config* config_ptr = or_null(in, &config);
  const bool abc = kind == 1;

  int64_t N = B;
  flashlin_slot_attention_inputs inputs{};
  inputs.cu_seqlens = in.ConsumeIntegralInRange<int>(0, 3) == 0
                          ? make_cu_seqlens(in, make, T, in.ConsumeBool() ? kI32 : kI64, &N)
                          : nullptr;
  inputs.q = make.make({B, T, H, K}, tok);
  inputs.k = make.make({B, T, H, K}, tok);
  inputs.v = make.make({B, T, H, V}, tok, true, alias == 1 ? shift : 0);
  inputs.s = make.make({B, T, H, M}, slot_type);
  // g: GSA's log forget gates (required), not ABC's (rejected); now and then the other way round.
  inputs.g = (abc == (in.ConsumeIntegralInRange<int>(0, 7) == 0))
                 ? make.make({B, T, H, M}, in.ConsumeBool() ? slot_type : pick_float(in))
                 : nullptr;
  inputs.initial_hk = in.ConsumeBool() ? make.make({N, H, K, M}, state_type) : nullptr;
  inputs.initial_hv = in.ConsumeBool()
                          ? make.make({N, H, M, V}, state_type, true, alias == 3 ? shift : 0)
                          : nullptr;
  // z: ABC only; required with hk / hv.
  const bool want_z =
      abc ? (inputs.initial_hk || inputs.initial_hv) != (in.ConsumeIntegralInRange<int>(0, 7) == 0)
          : in.ConsumeIntegralInRange<int>(0, 7) == 0;
  inputs.initial_z = want_z ? make.make({N, H, M}, state_type) : nullptr;
  const flashlin_slot_attention_inputs* inputs_ptr = or_null(in, &inputs);

  flashlin_slot_attention_outputs outputs{};
  outputs.o = make.make({B, T, H, V}, tok);
  outputs.final_hk = in.ConsumeBool() ? make.make({N, H, K, M}, state_type) : nullptr;
  outputs.final_hv = in.ConsumeBool() ? make.make({N, H, M, V}, state_type) : nullptr;
  outputs.final_z = (abc ? in.ConsumeBool() : in.ConsumeIntegralInRange<int>(0, 7) == 0)
                        ? make.make({N, H, M}, state_type)
                        : nullptr;
  switch (alias) {
    case 0: outputs.o = const_cast<DLTensor*>(inputs.q); break;  // rejected
    case 1: outputs.o = make.view_of(inputs.v, shift); break;
    case 2: outputs.final_hk = const_cast<DLTensor*>(inputs.initial_hk); break;  // in place
    case 3: outputs.final_hv = make.view_of(inputs.initial_hv, shift); break;
    case 4: outputs.final_hv = make.view_of(inputs.initial_hv, 0); break;      // in place, anew
    case 5: outputs.final_z = const_cast<DLTensor*>(inputs.initial_z); break;  // in place
    case 6: outputs.final_hv = outputs.final_hk; break;  // same shape when K == M == V
    case 7: outputs.final_hv = const_cast<DLTensor*>(inputs.initial_hk); break;  // not its pair
    case 8: outputs.o = const_cast<DLTensor*>(inputs.s); break;
    case 9: outputs.final_z = const_cast<DLTensor*>(inputs.cu_seqlens); break;
    default: break;
  }
  const flashlin_slot_attention_outputs* outputs_ptr = or_null(in, &outputs);
  const std::vector<const DLTensor*> ins = {inputs.q,          inputs.k,         inputs.v,
                                            inputs.s,          inputs.g,         inputs.initial_hk,
                                            inputs.initial_hv, inputs.initial_z, inputs.cu_seqlens};
  flashlin_execution exec_storage;
  const flashlin_execution* exec = pick_exec(in, exec_storage);

  size_t bytes = 0;
  size_t* bytes_ptr = or_null(in, &bytes);
  const int backward_flag = pick_backward_flag(in);
  const Outcome size = checked(make, {"flashlin_slot_attention_workspace_size", ins, {}, {}}, [&] {
    return flashlin_slot_attention_workspace_size(config_ptr, inputs_ptr, backward_flag, bytes_ptr);
  });
  const Outcome forward = checked(
      make,
      {"flashlin_slot_attention_forward",
       ins,
       {outputs.o, outputs.final_hk, outputs.final_hv, outputs.final_z},
       {{outputs.final_hk, inputs.initial_hk},
        {outputs.final_hv, inputs.initial_hv},
        {outputs.final_z, inputs.initial_z}}},
      [&] { return flashlin_slot_attention_forward(config_ptr, inputs_ptr, outputs_ptr, exec); });

  flashlin_slot_attention_output_grads output_grads{};
  output_grads.d_o = make.make({B, T, H, V}, tok);
  output_grads.d_final_hk = in.ConsumeBool() ? make.make({N, H, K, M}, state_type) : nullptr;
  output_grads.d_final_hv = in.ConsumeBool() ? make.make({N, H, M, V}, state_type) : nullptr;
  output_grads.d_final_z = (abc ? in.ConsumeBool() : in.ConsumeIntegralInRange<int>(0, 7) == 0)
                               ? make.make({N, H, M}, state_type)
                               : nullptr;
  flashlin_slot_attention_grads grads{};
  grads.dq = in.ConsumeBool() ? make.make({B, T, H, K}, tok) : nullptr;
  grads.dk = in.ConsumeBool() ? make.make({B, T, H, K}, tok) : nullptr;
  grads.dv = in.ConsumeBool() ? make.make({B, T, H, V}, tok) : nullptr;
  grads.ds = in.ConsumeBool() ? make.make({B, T, H, M}, slot_type) : nullptr;
  grads.dg = (inputs.g ? in.ConsumeBool() : in.ConsumeIntegralInRange<int>(0, 7) == 0)
                 ? make.make({B, T, H, M}, inputs.g ? inputs.g->dtype : slot_type)
                 : nullptr;
  grads.d_initial_hk = in.ConsumeBool() ? make.make({N, H, K, M}, state_type) : nullptr;
  grads.d_initial_hv = in.ConsumeBool() ? make.make({N, H, M, V}, state_type) : nullptr;
  grads.d_initial_z = in.ConsumeBool() ? make.make({N, H, M}, state_type) : nullptr;
  switch (in.ConsumeIntegralInRange<int>(0, 11)) {  // overlaps the backward must reject
    case 0: grads.dq = const_cast<DLTensor*>(inputs.q); break;
    case 1: grads.dk = grads.dq; break;
    case 2: grads.dv = const_cast<DLTensor*>(output_grads.d_o); break;
    case 3: grads.ds = const_cast<DLTensor*>(inputs.s); break;
    case 4: grads.dg = grads.ds; break;
    case 5: grads.d_initial_hk = const_cast<DLTensor*>(inputs.initial_hk); break;
    case 6: grads.d_initial_hv = const_cast<DLTensor*>(output_grads.d_final_hv); break;
    case 7: grads.d_initial_z = make.view_of(inputs.initial_z, 0); break;
    default: break;
  }
  const flashlin_slot_attention_output_grads* output_grads_ptr = or_null(in, &output_grads);
  const flashlin_slot_attention_grads* grads_ptr = or_null(in, &grads);
  std::vector<const DLTensor*> bwd_ins = ins;
  for (const DLTensor* t :
       {output_grads.d_o, output_grads.d_final_hk, output_grads.d_final_hv, output_grads.d_final_z})
    bwd_ins.push_back(t);
  const Outcome backward = checked(make,
                                   {"flashlin_slot_attention_backward",
                                    bwd_ins,
                                    {grads.dq, grads.dk, grads.dv, grads.ds, grads.dg,
                                     grads.d_initial_hk, grads.d_initial_hv, grads.d_initial_z},
                                    {}},
                                   [&] {
                                     return flashlin_slot_attention_backward(
                                         config_ptr, inputs_ptr, output_grads_ptr, grads_ptr, exec);
                                   });
  // The query checks bytes and its backward flag, then what both calls check first.
  if (!bytes_ptr || (backward_flag != 0 && backward_flag != 1)) return;
  require_agreement(size, forward, true);
  require_agreement(size, backward, true);
  if (size.ok() && (argument_error(forward.status) || argument_error(backward.status))) {
    // The query accepted the inputs: both calls on them, everything else valid, must too.
    flashlin_slot_attention_outputs plain{};
    plain.o = make.like(inputs.v);
    const Outcome f = checked(make, {"flashlin_slot_attention_forward", ins, {plain.o}, {}}, [&] {
      return flashlin_slot_attention_forward(config_ptr, inputs_ptr, &plain, nullptr);
    });
    if (argument_error(f.status)) __builtin_trap();
    flashlin_slot_attention_output_grads plain_grads{};
    plain_grads.d_o = make.like(inputs.v);
    const flashlin_slot_attention_grads none{};
    std::vector<const DLTensor*> minimal_ins = ins;
    minimal_ins.push_back(plain_grads.d_o);
    const Outcome b = checked(make, {"flashlin_slot_attention_backward", minimal_ins, {}, {}}, [&] {
      return flashlin_slot_attention_backward(config_ptr, inputs_ptr, &plain_grads, &none, nullptr);
    });
    if (argument_error(b.status)) __builtin_trap();
  }
}

// --- Transformer-VQ attention
// ---------------------------------------------------------------------

void fuzz_vq_attention(FuzzedDataProvider& in, Builder& make) {
  const DLDataType tok = pick_float(in), code_type = pick_float(in);
  const DLDataType state_type = in.ConsumeBool() ? kF32 : pick_float(in);
  const int alias = in.ConsumeIntegralInRange<int>(0, 15);
  const int64_t shift = in.ConsumeIntegralInRange<int64_t>(1, 3);
  const int64_t B = in.ConsumeIntegralInRange<int64_t>(0, 3),
                T = in.ConsumeIntegralInRange<int64_t>(0, 70);
  const int64_t H = in.ConsumeIntegralInRange<int64_t>(0, 3);
  const int64_t K = pick_size(in, 9, {0, 1, 33});
  const int64_t V = pick_size(in, 9, {0, 1, 33});
  const int64_t S = pick_size(in, 9, {0, 1, 16, 4096, 4097});  // 1..4096 codes on the CPU

  flashlin_vq_attention_config config{};
  config.scale = pick_scale(in);
  config.block_len =
      in.ConsumeBool()
          ? in.PickValueInArray({0, 16, 17, 64, 1024, 15, 1025, 1, -1, -16, kInt32Max, kInt32Min})
          : in.ConsumeIntegralInRange<int32_t>(0, 80);
  config.key_grad = in.PickValueInArray({0, 1, 0, 1, 2, -1, kInt32Max});
  const flashlin_vq_attention_config* config_ptr = or_null(in, &config);

  int64_t N = B;
  flashlin_vq_attention_inputs inputs{};
  inputs.cu_seqlens = in.ConsumeIntegralInRange<int>(0, 3) == 0
                          ? make_cu_seqlens(in, make, T, in.ConsumeBool() ? kI32 : kI64, &N)
                          : nullptr;
  inputs.q = make.make({B, T, H, K}, tok);
  inputs.k = make.make({B, T, H, K}, tok);
  inputs.v = make.make({B, T, H, V}, tok, true, alias == 1 ? shift : 0);
  inputs.codebook = make.make({H, S, K}, code_type);
  inputs.initial_state = in.ConsumeBool()
                             ? make.make({N, H, S, V + 1}, state_type, true, alias == 3 ? shift : 0)
                             : nullptr;
  const flashlin_vq_attention_inputs* inputs_ptr = or_null(in, &inputs);

  DLTensor* o = make.make({B, T, H, V}, tok);
  DLTensor* codes = in.ConsumeIntegralInRange<int>(0, 2)
                        ? make.make({B, T, H}, in.ConsumeBool() ? kI32 : kI64)
                        : nullptr;
  DLTensor* final_state = in.ConsumeBool() ? make.make({N, H, S, V + 1}, state_type) : nullptr;
  switch (alias) {
    case 0: o = const_cast<DLTensor*>(inputs.q); break;  // rejected
    case 1: o = make.view_of(inputs.v, shift); break;
    case 2: final_state = const_cast<DLTensor*>(inputs.initial_state); break;  // in place
    case 3: final_state = make.view_of(inputs.initial_state, shift); break;
    case 4: final_state = make.view_of(inputs.initial_state, 0); break;  // in place, anew
    case 5: final_state = o; break;
    case 6: o = const_cast<DLTensor*>(inputs.codebook); break;
    case 7: codes = const_cast<DLTensor*>(inputs.cu_seqlens); break;
    case 8: codes = make.view_of(codes, 0); break;  // the same codes, described anew: fine
    case 9: codes = o; break;                       // a float tensor: rejected
    default: break;
  }
  const std::vector<const DLTensor*> ins = {
      inputs.q, inputs.k, inputs.v, inputs.codebook, inputs.initial_state, inputs.cu_seqlens};
  flashlin_execution exec_storage;
  const flashlin_execution* exec = pick_exec(in, exec_storage);

  size_t bytes = 0;
  size_t* bytes_ptr = or_null(in, &bytes);
  const int backward_flag = pick_backward_flag(in);
  const Outcome size = checked(make, {"flashlin_vq_attention_workspace_size", ins, {}, {}}, [&] {
    return flashlin_vq_attention_workspace_size(config_ptr, inputs_ptr, backward_flag, bytes_ptr);
  });
  const Outcome forward = checked(make,
                                  {"flashlin_vq_attention_forward",
                                   ins,
                                   {o, codes, final_state},
                                   {{final_state, inputs.initial_state}}},
                                  [&] {
                                    return flashlin_vq_attention_forward(config_ptr, inputs_ptr, o,
                                                                         codes, final_state, exec);
                                  });

  const DLTensor* d_o = make.make({B, T, H, V}, tok);
  const DLTensor* d_final = in.ConsumeBool() ? make.make({N, H, S, V + 1}, state_type) : nullptr;
  flashlin_vq_attention_grads grads{};
  grads.dq = in.ConsumeBool() ? make.make({B, T, H, K}, tok) : nullptr;
  grads.dk = in.ConsumeBool() ? make.make({B, T, H, K}, tok) : nullptr;
  grads.dv = in.ConsumeBool() ? make.make({B, T, H, V}, tok) : nullptr;
  grads.d_initial_state = in.ConsumeBool() ? make.make({N, H, S, V + 1}, state_type) : nullptr;
  switch (in.ConsumeIntegralInRange<int>(0, 11)) {  // overlaps the backward must reject
    case 0: grads.dq = const_cast<DLTensor*>(inputs.q); break;
    case 1: grads.dk = grads.dq; break;
    case 2: grads.dv = const_cast<DLTensor*>(d_o); break;
    case 3: grads.d_initial_state = const_cast<DLTensor*>(inputs.initial_state); break;
    case 4: grads.d_initial_state = const_cast<DLTensor*>(d_final); break;
    case 5: grads.dk = make.view_of(inputs.k, 0); break;
    case 6: grads.dq = const_cast<DLTensor*>(inputs.codebook); break;
    default: break;
  }
  const flashlin_vq_attention_grads* grads_ptr = or_null(in, &grads);
  std::vector<const DLTensor*> bwd_ins = ins;
  bwd_ins.push_back(d_o);
  bwd_ins.push_back(d_final);
  const Outcome backward = checked(make,
                                   {"flashlin_vq_attention_backward",
                                    bwd_ins,
                                    {grads.dq, grads.dk, grads.dv, grads.d_initial_state},
                                    {}},
                                   [&] {
                                     return flashlin_vq_attention_backward(
                                         config_ptr, inputs_ptr, d_o, d_final, grads_ptr, exec);
                                   });
  // The query checks bytes, then what both calls check first (any backward flag is accepted).
  if (!bytes_ptr) return;
  require_agreement(size, forward, true);
  require_agreement(size, backward, true);
  if (size.ok() && (argument_error(forward.status) || argument_error(backward.status))) {
    // The query accepted the inputs: both calls on them, everything else valid, must too.
    DLTensor* plain_o = make.like(inputs.v);
    const Outcome f = checked(make, {"flashlin_vq_attention_forward", ins, {plain_o}, {}}, [&] {
      return flashlin_vq_attention_forward(config_ptr, inputs_ptr, plain_o, nullptr, nullptr,
                                           nullptr);
    });
    if (argument_error(f.status)) __builtin_trap();
    const flashlin_vq_attention_grads none{};
    const DLTensor* plain_do = make.like(inputs.v);
    std::vector<const DLTensor*> minimal_ins = ins;
    minimal_ins.push_back(plain_do);
    const Outcome b = checked(make, {"flashlin_vq_attention_backward", minimal_ins, {}, {}}, [&] {
      return flashlin_vq_attention_backward(config_ptr, inputs_ptr, plain_do, nullptr, &none,
                                            nullptr);
    });
    if (argument_error(b.status)) __builtin_trap();
  }
}

// --- GateLoop
// ------------------------------------------------------------------------------------

// A complex state dtype: usually complex64 / complex128, sometimes one the API rejects (complex of
// 16 or 32 bits, two lanes, a real float where a complex tensor belongs).
DLDataType pick_complex(FuzzedDataProvider& in) {
  if (in.ConsumeIntegralInRange<int>(0, 7) != 0)
    return in.ConsumeBool() ? DLDataType{kDLComplex, 64, 1} : DLDataType{kDLComplex, 128, 1};
  return in.PickValueInArray({DLDataType{kDLComplex, 32, 1}, DLDataType{kDLComplex, 64, 2},
                              DLDataType{kDLComplex, 16, 1}, DLDataType{kDLFloat, 32, 1},
                              DLDataType{kDLFloat, 64, 1}, DLDataType{kDLFloat, 32, 2}});
}

// The argument a failed call's message names ("argument 'q': expected ..."), or "".
std::string failed_argument(const Outcome& outcome) {
  static const char kPrefix[] = "argument '";
  if (outcome.message.compare(0, sizeof kPrefix - 1, kPrefix) != 0) return "";
  const size_t end = outcome.message.find('\'', sizeof kPrefix - 1);
  return end == std::string::npos
             ? ""
             : outcome.message.substr(sizeof kPrefix - 1, end - (sizeof kPrefix - 1));
}

void fuzz_gateloop(FuzzedDataProvider& in, Builder& make) {
  // q/k/v one floating dtype (now and then a complex one: rejected); g and theta any floating one.
  const DLDataType tok =
      in.ConsumeIntegralInRange<int>(0, 15) == 0 ? pick_complex(in) : pick_float(in);
  const DLDataType gate_type = in.ConsumeBool() ? kF32 : pick_float(in);
  const DLDataType phase_type = in.ConsumeBool() ? gate_type : pick_float(in);
  const DLDataType state_type = pick_complex(in);
  // Each state now and then of its own (complex) dtype: each is checked on its own.
  const auto state_dtype = [&] {
    return in.ConsumeIntegralInRange<int>(0, 5) ? state_type : pick_complex(in);
  };
  const int alias = in.ConsumeIntegralInRange<int>(0, 15);
  const int bwd_alias = in.ConsumeIntegralInRange<int>(0, 15);
  const int64_t shift = in.ConsumeIntegralInRange<int64_t>(1, 3);
  const int64_t B = in.ConsumeIntegralInRange<int64_t>(0, 3),
                T = in.ConsumeIntegralInRange<int64_t>(0, 40);
  const int64_t H = in.ConsumeIntegralInRange<int64_t>(0, 3);
  const int64_t K = pick_size(in, 7, {0, 1, 2048, 2049});  // 1..2048 (the recurrence's 2K)
  const int64_t V = pick_size(in, 7, {0, 1, 4096, 4097});  // 1..4096

  flashlin_gateloop_config config{};
  config.scale = pick_scale(in);
  set_enum(in, config.form, 2);
  config.chunk_size =
      in.ConsumeBool()
          ? in.PickValueInArray({0, 1, 3, 16, 64, 1024, 1025, -1, -64, kInt32Max, kInt32Min})
          : in.ConsumeIntegralInRange<int32_t>(0, 70);
  const flashlin_gateloop_config* config_ptr = or_null(in, &config);

  int64_t N = B;
  flashlin_gateloop_inputs inputs{};
  inputs.cu_seqlens = in.ConsumeIntegralInRange<int>(0, 3) == 0
                          ? make_cu_seqlens(in, make, T, in.ConsumeBool() ? kI32 : kI64, &N)
                          : nullptr;
  inputs.q = make.make({B, T, H, K}, tok);
  inputs.k = make.make({B, T, H, K}, tok);
  inputs.v = make.make({B, T, H, V}, tok, true, alias == 1 ? shift : 0);
  inputs.g = make.make({B, T, H, K}, gate_type);  // required: NULL 1 time in 10
  inputs.theta =
      in.ConsumeIntegralInRange<int>(0, 3) ? make.make({B, T, H, K}, phase_type) : nullptr;
  inputs.initial_state = in.ConsumeBool() ? make.make({N, H, K, V}, state_dtype(), true,
                                                      (alias == 3 || alias == 5) ? shift : 0)
                                          : nullptr;
  const flashlin_gateloop_inputs* inputs_ptr = or_null(in, &inputs);

  DLTensor* o = make.make({B, T, H, V}, tok);
  DLTensor* final_state = in.ConsumeBool() ? make.make({N, H, K, V}, state_dtype()) : nullptr;
  switch (alias) {
    case 0: o = const_cast<DLTensor*>(inputs.q); break;  // o aliases q: rejected
    case 1: o = make.view_of(inputs.v, shift); break;    // overlaps v, shifted
    case 2: final_state = const_cast<DLTensor*>(inputs.initial_state); break;  // in place
    case 3: final_state = make.view_of(inputs.initial_state, shift); break;
    case 4: final_state = make.view_of(inputs.initial_state, 0); break;  // in place, described anew
    case 5:  // shifted by half an element: the real parts on the imaginary ones
      final_state = make.view_of(inputs.initial_state, shift);
      if (final_state) final_state->byte_offset -= item_bytes(final_state->dtype) / 2;
      break;
    case 6: final_state = o; break;
    case 7: o = const_cast<DLTensor*>(inputs.g); break;
    case 8: final_state = const_cast<DLTensor*>(inputs.theta); break;  // real: rejected
    case 9: o = const_cast<DLTensor*>(inputs.cu_seqlens); break;
    case 10: o = const_cast<DLTensor*>(inputs.v); break;  // no in-place attention: rejected
    default: break;
  }
  const std::vector<const DLTensor*> ins = {inputs.q,         inputs.k,     inputs.v,
                                            inputs.g,         inputs.theta, inputs.initial_state,
                                            inputs.cu_seqlens};
  flashlin_execution exec_storage;
  const flashlin_execution* exec = pick_exec(in, exec_storage);
  const Outcome forward = checked(
      make,
      {"flashlin_gateloop_forward", ins, {o, final_state}, {{final_state, inputs.initial_state}}},
      [&] { return flashlin_gateloop_forward(config_ptr, inputs_ptr, o, final_state, exec); });

  const DLTensor* d_o = make.make({B, T, H, V}, tok);
  const DLTensor* d_final =
      in.ConsumeBool() ? make.make({N, H, K, V}, state_dtype(), true, bwd_alias == 8 ? shift : 0)
                       : nullptr;
  flashlin_gateloop_grads grads{};
  grads.dq = in.ConsumeBool() ? make.make({B, T, H, K}, tok) : nullptr;
  grads.dk = in.ConsumeBool() ? make.make({B, T, H, K}, tok) : nullptr;
  grads.dv = in.ConsumeBool() ? make.make({B, T, H, V}, tok) : nullptr;
  grads.dg =
      in.ConsumeBool() ? make.make({B, T, H, K}, inputs.g ? inputs.g->dtype : gate_type) : nullptr;
  // dtheta requires theta, d_initial_state initial_state: now and then without it (rejected).
  grads.dtheta = (inputs.theta ? in.ConsumeBool() : in.ConsumeIntegralInRange<int>(0, 7) == 0)
                     ? make.make({B, T, H, K}, phase_type)
                     : nullptr;
  grads.d_initial_state =
      (inputs.initial_state ? in.ConsumeBool() : in.ConsumeIntegralInRange<int>(0, 7) == 0)
          ? make.make({N, H, K, V}, state_dtype())
          : nullptr;
  switch (bwd_alias) {  // overlaps the backward must reject
    case 0: grads.dq = const_cast<DLTensor*>(inputs.q); break;
    case 1: grads.dk = grads.dq; break;
    case 2: grads.dv = const_cast<DLTensor*>(d_o); break;
    case 3: grads.d_initial_state = const_cast<DLTensor*>(inputs.initial_state); break;
    case 4: grads.d_initial_state = const_cast<DLTensor*>(d_final); break;
    case 5: grads.dk = make.view_of(inputs.k, 0); break;
    case 6: grads.dtheta = const_cast<DLTensor*>(inputs.theta); break;
    case 7: grads.dg = grads.dtheta; break;  // same shape, often the same dtype
    case 8: grads.d_initial_state = make.view_of(d_final, shift); break;
    case 9: grads.dtheta = make.view_of(inputs.g, 0); break;
    case 10: grads.d_initial_state = make.view_of(inputs.initial_state, 0); break;
    default: break;
  }
  const flashlin_gateloop_grads* grads_ptr = or_null(in, &grads);
  std::vector<const DLTensor*> bwd_ins = ins;
  bwd_ins.push_back(d_o);
  bwd_ins.push_back(d_final);
  const Outcome backward = checked(
      make,
      {"flashlin_gateloop_backward",
       bwd_ins,
       {grads.dq, grads.dk, grads.dv, grads.dg, grads.dtheta, grads.d_initial_state},
       {}},
      [&] {
        return flashlin_gateloop_backward(config_ptr, inputs_ptr, d_o, d_final, grads_ptr, exec);
      });

  // Both calls check config and inputs first, alike: a call rejecting one of those arguments
  // makes the other reject it with the same status and message.
  static const char* const kCommon[] = {
      "config", "inputs", "config.form", "config.chunk_size", "config.scale", "q", "k",
      "v",      "g",      "theta",       "initial_state",     "cu_seqlens"};
  for (const Outcome* a : {&forward, &backward}) {
    const Outcome& b = a == &forward ? backward : forward;
    if (!argument_error(a->status)) continue;
    const std::string arg = failed_argument(*a);
    for (const char* common : kCommon)
      if (arg == common && (b.status != a->status || b.message != a->message)) __builtin_trap();
  }
  // A call that accepted config and inputs: the other call on them, everything else valid and
  // minimal, accepts them too.
  if (forward.ok() || backward.ok()) {
    DLTensor* plain_o = make.like(inputs.v);
    const Outcome f = checked(make, {"flashlin_gateloop_forward", ins, {plain_o}, {}}, [&] {
      return flashlin_gateloop_forward(config_ptr, inputs_ptr, plain_o, nullptr, nullptr);
    });
    if (argument_error(f.status)) __builtin_trap();
    const flashlin_gateloop_grads none{};
    const DLTensor* plain_do = make.like(inputs.v);
    std::vector<const DLTensor*> minimal_ins = ins;
    minimal_ins.push_back(plain_do);
    const Outcome b = checked(make, {"flashlin_gateloop_backward", minimal_ins, {}, {}}, [&] {
      return flashlin_gateloop_backward(config_ptr, inputs_ptr, plain_do, nullptr, &none, nullptr);
    });
    if (argument_error(b.status)) __builtin_trap();
  }
}

// The entry-point family of an input: its first byte. Selectors 0xC2..0xE1 (which no seed of the
// older families begins with) pick the newer op families, Based, slot attention and
// Transformer-VQ in turn; 0xEF..0xFD (which no seed began with when GateLoop came: a fourth entry
// in the cycle above would have moved the committed Based / slot / VQ seeds to other families)
// pick GateLoop; every other selector keeps its meaning, selector % 8 over the older families
// (the recurrence for three values in eight, so that it keeps most of the time; an empty input
// too).
using Family = void (*)(FuzzedDataProvider&, Builder&);
Family family_of(uint8_t selector) {
  static const Family kNewer[3] = {fuzz_based, fuzz_slot_attention, fuzz_vq_attention};
  if (selector >= 0xC2 && selector <= 0xE1) return kNewer[(selector - 0xC2) % 3];
  if (selector >= 0xEF && selector <= 0xFD) return fuzz_gateloop;
  static const Family kFamilies[8] = {fuzz_recurrence, fuzz_recurrence, fuzz_recurrence,
                                      fuzz_rms_norm,   fuzz_rms_norm,   fuzz_rotary,
                                      fuzz_short_conv, fuzz_short_conv};
  return kFamilies[selector % 8];
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Family family = size ? family_of(data[0]) : fuzz_recurrence;
  FuzzedDataProvider in(size ? data + 1 : data, size ? size - 1 : 0);
  Builder make(in);
  family(in, make);
  return 0;
}
