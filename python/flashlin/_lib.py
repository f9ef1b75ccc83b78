"""Loading libflashlin with ctypes and passing torch tensors to it as DLPack views.

No compiled extension and no dependency on torch's C++ ABI: a DLTensor is filled in from the
tensor's data pointer, shape, strides, dtype and device, so torch 1.13 and 2.x work alike.
The library is looked for, in order: $FLASHLIN_LIBRARY, next to this package (pip install),
flashlin/ in each sys.path entry (pip install -e .), and the source tree's build folders (build/,
build-*/).
"""
import ctypes
import glob
import os
import sys

import torch

_LIB_NAME = "libflashlin.so"

# Status codes (flashlin.h).
SUCCESS, INVALID_ARGUMENT, UNSUPPORTED, BACKEND_ERROR, OUT_OF_MEMORY = range(5)

# flashlin_gate_kind, flashlin_form (flashlin.h).
GATE_NONE, GATE_PER_HEAD, GATE_PER_TOKEN, GATE_PER_KEY = range(4)
FORMS = {"chunked": 0, "recurrent": 1, "parallel": 2}


class FlashlinError(RuntimeError):
    """A failure inside the library (not a bad argument)."""


class UnsupportedError(FlashlinError, NotImplementedError):
    """A valid request the library does not support (size, device, build without CUDA)."""


# --- DLPack (dlpack.h, v0.6 layout) ---------------------------------------------------------------
class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_DL_INT, _DL_FLOAT, _DL_BFLOAT, _DL_COMPLEX = 0, 2, 4, 5
_DL_CPU, _DL_CUDA = 1, 2
_DL_DTYPES = {
    torch.float32: DLDataType(_DL_FLOAT, 32, 1),
    torch.float64: DLDataType(_DL_FLOAT, 64, 1),
    torch.float16: DLDataType(_DL_FLOAT, 16, 1),
    torch.bfloat16: DLDataType(_DL_BFLOAT, 16, 1),
    torch.int32: DLDataType(_DL_INT, 32, 1),
    torch.int64: DLDataType(_DL_INT, 64, 1),
    torch.complex64: DLDataType(_DL_COMPLEX, 64, 1),  # GateLoop's states
    torch.complex128: DLDataType(_DL_COMPLEX, 128, 1),
}


_INT64_ARRAYS = [ctypes.c_int64 * max(n, 1) for n in range(9)]
_CPU_DEVICE = DLDevice(_DL_CPU, 0)
_HAS_IS_CPU = hasattr(torch.Tensor, "is_cpu")


class TensorView:
    """A DLTensor describing a torch tensor (which it keeps alive), or NULL for None.

    On the hot path of every call (a decode step builds nine): cached dtype descriptors and array
    types, no torch.device objects."""

    __slots__ = ("tensor", "pointer", "dl", "_shape", "_strides")

    def __init__(self, tensor, name):
        self.tensor = tensor
        if tensor is None:
            self.pointer = None
            return
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"argument '{name}': expected a torch.Tensor, got {type(tensor).__name__}")
        dl_dtype = _DL_DTYPES.get(tensor.dtype)
        if dl_dtype is None:
            raise ValueError(f"argument '{name}': unsupported dtype {tensor.dtype}")
        if tensor.is_cuda:
            device = DLDevice(_DL_CUDA, tensor.get_device())
        elif tensor.is_cpu if _HAS_IS_CPU else tensor.device.type == "cpu":
            device = _CPU_DEVICE
        else:
            raise ValueError(f"argument '{name}': unsupported device {tensor.device}")
        ndim = tensor.dim()
        array = _INT64_ARRAYS[ndim] if ndim < len(_INT64_ARRAYS) else ctypes.c_int64 * ndim
        self._shape = array(*tensor.shape)
        self._strides = array(*tensor.stride())
        self.dl = DLTensor(tensor.data_ptr(), device, ndim, dl_dtype, self._shape, self._strides, 0)
        self.pointer = ctypes.pointer(self.dl)


# --- The C ABI (flashlin.h) -----------------------------------------------------------------------
class RecurrenceConfig(ctypes.Structure):
    _fields_ = [("gate_kind", ctypes.c_int), ("form", ctypes.c_int), ("scale", ctypes.c_double),
                ("chunk_size", ctypes.c_int32), ("reverse", ctypes.c_int32),
                ("bonus", ctypes.c_int32)]


_PDL = ctypes.POINTER(DLTensor)


class RecurrenceInputs(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in
                ("q", "k", "v", "g", "u", "initial_state", "cu_seqlens")]


class RecurrenceGrads(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in ("dq", "dk", "dv", "dg", "du", "d_initial_state")]


class Execution(ctypes.Structure):
    _fields_ = [("stream", ctypes.c_void_p), ("workspace", ctypes.c_void_p),
                ("workspace_bytes", ctypes.c_size_t)]


class RmsNormConfig(ctypes.Structure):
    _fields_ = [("eps", ctypes.c_double), ("gate", ctypes.c_int)]


class RotaryConfig(ctypes.Structure):
    _fields_ = [("base", ctypes.c_double), ("rotary_dim", ctypes.c_int32),
                ("interleaved", ctypes.c_int32), ("inverse", ctypes.c_int32),
                ("offset", ctypes.c_int64)]


class ShortConvConfig(ctypes.Structure):
    _fields_ = [("activation", ctypes.c_int)]


class ShortConvInputs(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in ("x", "weight", "bias", "initial_cache", "cu_seqlens")]


class ShortConvGrads(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in ("dx", "dweight", "dbias", "d_initial_cache")]


# Based (flashlin_based_*).
class BasedConfig(ctypes.Structure):
    _fields_ = [("scale", ctypes.c_double), ("use_norm", ctypes.c_int32), ("form", ctypes.c_int)]


class BasedInputs(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in ("q", "k", "v", "initial_state", "cu_seqlens")]


class BasedGrads(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in ("dq", "dk", "dv", "d_initial_state")]


# ABC / GSA slot attention (flashlin_slot_attention_*).
SLOT_KINDS = {"gsa": 0, "abc": 1}  # flashlin_slot_kind


class SlotAttentionConfig(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("form", ctypes.c_int), ("scale", ctypes.c_double)]


class SlotAttentionInputs(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in ("q", "k", "v", "s", "g", "initial_hk", "initial_hv",
                                          "initial_z", "cu_seqlens")]


class SlotAttentionOutputs(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in ("o", "final_hk", "final_hv", "final_z")]


class SlotAttentionOutputGrads(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in ("d_o", "d_final_hk", "d_final_hv", "d_final_z")]


class SlotAttentionGrads(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in ("dq", "dk", "dv", "ds", "dg", "d_initial_hk",
                                          "d_initial_hv", "d_initial_z")]


# GateLoop (flashlin_gateloop_*).
class GateloopConfig(ctypes.Structure):
    _fields_ = [("scale", ctypes.c_double), ("form", ctypes.c_int), ("chunk_size", ctypes.c_int32)]


class GateloopInputs(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in
                ("q", "k", "v", "g", "theta", "initial_state", "cu_seqlens")]


class GateloopGrads(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in ("dq", "dk", "dv", "dg", "dtheta", "d_initial_state")]


# Transformer-VQ (flashlin_vq_attention_*).
class VqAttentionConfig(ctypes.Structure):
    _fields_ = [("scale", ctypes.c_double), ("block_len", ctypes.c_int32),
                ("key_grad", ctypes.c_int32)]


class VqAttentionInputs(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in
                ("q", "k", "v", "codebook", "initial_state", "cu_seqlens")]


class VqAttentionGrads(ctypes.Structure):
    _fields_ = [(name, _PDL) for name in ("dq", "dk", "dv", "d_initial_state")]


# flashlin_norm_gate, flashlin_activation (flashlin.h).
NORM_GATES = {None: 0, "swish": 1, "silu": 1, "sigmoid": 2}
ACTIVATIONS = {None: 0, "silu": 1, "swish": 1}

_SIZE_P = ctypes.POINTER(ctypes.c_size_t)
# Entry points and their argument types; bound when the library has them (an older build loads,
# and only the calls it lacks fail).
_SIGNATURES = {
    "flashlin_recurrence_forward": [
        ctypes.POINTER(RecurrenceConfig), ctypes.POINTER(RecurrenceInputs), _PDL, _PDL,
        ctypes.POINTER(Execution)],
    "flashlin_recurrence_backward": [
        ctypes.POINTER(RecurrenceConfig), ctypes.POINTER(RecurrenceInputs), _PDL, _PDL,
        ctypes.POINTER(RecurrenceGrads), ctypes.POINTER(Execution)],
    "flashlin_recurrence_workspace_size": [
        ctypes.POINTER(RecurrenceConfig), ctypes.POINTER(RecurrenceInputs), ctypes.c_int, _SIZE_P],
    "flashlin_recurrence_backward_workspace_size": [
        ctypes.POINTER(RecurrenceConfig), ctypes.POINTER(RecurrenceInputs), _PDL, _PDL,
        ctypes.POINTER(RecurrenceGrads), _SIZE_P],
    "flashlin_rms_norm_forward": [
        ctypes.POINTER(RmsNormConfig), _PDL, _PDL, _PDL, _PDL, _PDL, ctypes.POINTER(Execution)],
    "flashlin_rms_norm_backward": [
        ctypes.POINTER(RmsNormConfig), _PDL, _PDL, _PDL, _PDL, _PDL, _PDL, _PDL, _PDL, _PDL,
        ctypes.POINTER(Execution)],
    "flashlin_rms_norm_backward_workspace_size": [_PDL, _SIZE_P],
    "flashlin_rotary": [ctypes.POINTER(RotaryConfig), _PDL, _PDL, _PDL, _PDL,
                        ctypes.POINTER(Execution)],
    "flashlin_short_conv_forward": [
        ctypes.POINTER(ShortConvConfig), ctypes.POINTER(ShortConvInputs), _PDL, _PDL,
        ctypes.POINTER(Execution)],
    "flashlin_short_conv_backward": [
        ctypes.POINTER(ShortConvConfig), ctypes.POINTER(ShortConvInputs), _PDL, _PDL,
        ctypes.POINTER(ShortConvGrads), ctypes.POINTER(Execution)],
    "flashlin_short_conv_backward_workspace_size": [ctypes.POINTER(ShortConvInputs), _SIZE_P],
    # Based
    "flashlin_based_forward": [
        ctypes.POINTER(BasedConfig), ctypes.POINTER(BasedInputs), _PDL, _PDL,
        ctypes.POINTER(Execution)],
    "flashlin_based_backward": [
        ctypes.POINTER(BasedConfig), ctypes.POINTER(BasedInputs), _PDL, _PDL,
        ctypes.POINTER(BasedGrads), ctypes.POINTER(Execution)],
    "flashlin_based_workspace_size": [
        ctypes.POINTER(BasedConfig), ctypes.POINTER(BasedInputs), ctypes.c_int, _SIZE_P],

    # GateLoop
    "flashlin_gateloop_forward": [
        ctypes.POINTER(GateloopConfig), ctypes.POINTER(GateloopInputs), _PDL, _PDL,
        ctypes.POINTER(Execution)],
    "flashlin_gateloop_backward": [
        ctypes.POINTER(GateloopConfig), ctypes.POINTER(GateloopInputs), _PDL, _PDL,
        ctypes.POINTER(GateloopGrads), ctypes.POINTER(Execution)],

    # ABC / GSA slot attention
    "flashlin_slot_attention_forward": [
        ctypes.POINTER(SlotAttentionConfig), ctypes.POINTER(SlotAttentionInputs),
        ctypes.POINTER(SlotAttentionOutputs), ctypes.POINTER(Execution)],
    "flashlin_slot_attention_backward": [
        ctypes.POINTER(SlotAttentionConfig), ctypes.POINTER(SlotAttentionInputs),
        ctypes.POINTER(SlotAttentionOutputGrads), ctypes.POINTER(SlotAttentionGrads),
        ctypes.POINTER(Execution)],
    "flashlin_slot_attention_workspace_size": [
        ctypes.POINTER(SlotAttentionConfig), ctypes.POINTER(SlotAttentionInputs), ctypes.c_int,
        _SIZE_P],

    # Transformer-VQ
    "flashlin_vq_attention_forward": [
        ctypes.POINTER(VqAttentionConfig), ctypes.POINTER(VqAttentionInputs), _PDL, _PDL, _PDL,
        ctypes.POINTER(Execution)],
    "flashlin_vq_attention_backward": [
        ctypes.POINTER(VqAttentionConfig), ctypes.POINTER(VqAttentionInputs), _PDL, _PDL,
        ctypes.POINTER(VqAttentionGrads), ctypes.POINTER(Execution)],
    "flashlin_vq_attention_forward_lse": [
        ctypes.POINTER(VqAttentionConfig), ctypes.POINTER(VqAttentionInputs), _PDL, _PDL, _PDL,
        _PDL, ctypes.POINTER(Execution)],
    "flashlin_vq_attention_backward_lse": [
        ctypes.POINTER(VqAttentionConfig), ctypes.POINTER(VqAttentionInputs), _PDL, _PDL, _PDL,
        _PDL, _PDL, ctypes.POINTER(VqAttentionGrads), ctypes.POINTER(Execution)],
    "flashlin_vq_attention_workspace_size": [
        ctypes.POINTER(VqAttentionConfig), ctypes.POINTER(VqAttentionInputs), ctypes.c_int,
        _SIZE_P],

}


def _candidates():
    env = os.environ.get("FLASHLIN_LIBRARY")
    if env:
        yield env
    here = os.path.dirname(os.path.abspath(__file__))
    yield os.path.join(here, _LIB_NAME)
    # An editable install (pip install -e .) leaves the Python files in the source tree and puts
    # the library in site-packages/flashlin/.
    for entry in sys.path:
        yield os.path.join(entry, "flashlin", _LIB_NAME)
    root = os.path.dirname(os.path.dirname(here))  # python/flashlin -> repository root
    yield os.path.join(root, "build", _LIB_NAME)
    yield from sorted(glob.glob(os.path.join(root, "build-*", _LIB_NAME)))


def _load():
    tried = []
    for path in _candidates():
        tried.append(path)
        if os.path.exists(path):
            lib = ctypes.CDLL(path)
            break
    else:
        raise ImportError(
            "flashlin: cannot find libflashlin.so; looked at:\n  " + "\n  ".join(tried) +
            "\nBuild it (bash scripts/build.sh), pip install the package, or set FLASHLIN_LIBRARY.")
    lib.flashlin_version.restype = ctypes.c_char_p
    lib.flashlin_last_error.restype = ctypes.c_char_p
    lib.flashlin_cpu_isa.restype = ctypes.c_char_p
    lib.flashlin_has_cuda.restype = ctypes.c_int
    lib.flashlin_set_num_threads.argtypes = [ctypes.c_int]
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name, None)
        if function is not None:
            function.argtypes = argtypes
    lib.path = path
    return lib


lib = _load()


def entry(name):
    """The library's entry point `name`; a clear error when the loaded build predates it."""
    function = getattr(lib, name, None)
    if function is None:
        raise UnsupportedError(f"{name}: not in the loaded library {lib.path} (an older build? "
                               "rebuild with bash scripts/build.sh)")
    return function


def compiling():
    """Whether torch.compile is tracing the caller (the ops then call their torch.library custom
    ops, whose graphs hold no ctypes objects)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling")
                and compiler.is_compiling())


def on_host(tensor):
    """cu_seqlens and offsets for the library, which reads them on the host: a CUDA tensor is
    copied to the CPU, anything else is returned as it is."""
    return tensor.cpu() if isinstance(tensor, torch.Tensor) and tensor.is_cuda else tensor


def rename_arguments(message, names):
    for c_name, py_name in (names or {}).items():
        message = message.replace(f"argument '{c_name}'", f"argument '{py_name}'")
    return message


def check(status, names=None):
    """Raises for a non-zero status, naming arguments as the caller knows them (names maps the
    C ABI's argument names, e.g. 'q', to the op's, e.g. 'r')."""
    if status == SUCCESS:
        return
    message = rename_arguments(lib.flashlin_last_error().decode(), names)
    if status == INVALID_ARGUMENT:
        raise ValueError(message)
    if status == UNSUPPORTED:
        raise UnsupportedError(message)
    if status == OUT_OF_MEMORY:
        raise MemoryError(message)
    raise FlashlinError(message)


def execution_for(tensor, size_query=None):
    """Run on torch's current stream for CUDA tensors, with scratch memory from torch's caching
    allocator (so it shows in torch.cuda.memory_allocated and is reused across calls).

    size_query(bytes_pointer) -> status: the library's workspace-size query for the call (None:
    the call needs no scratch, or allocates what it needs itself). Returns (execution struct,
    workspace tensor or None); keep the tensor alive for the call."""
    if not tensor.is_cuda:
        return Execution(None, None, 0), None
    stream = torch.cuda.current_stream(tensor.device).cuda_stream
    workspace = None
    if size_query is not None:
        size = ctypes.c_size_t(0)
        # a failing size query is reported by the call itself, with its message
        if size_query(ctypes.byref(size)) == SUCCESS and size.value > 0:
            workspace = torch.empty(size.value, dtype=torch.uint8, device=tensor.device)
    if workspace is None:
        return Execution(stream, None, 0), None
    return Execution(stream, workspace.data_ptr(), workspace.numel()), workspace