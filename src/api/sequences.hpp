// Shared by the C ABI entry points (recurrence_api.cpp, modules_api.cpp, ...): the mapping of a
// DLTensor onto the four logical dimensions of a StridedTensor, the sequences of token tensors
// (batch rows, or the packed spans of cu_seqlens) with the host integer tensors that describe
// them, and the argument checks of the recurrence that the ops built on it repeat.
#ifndef FLASHLIN_SRC_API_SEQUENCES_HPP_
#define FLASHLIN_SRC_API_SEQUENCES_HPP_

#include <dlpack/dlpack.h>

#include <cstdint>
#include <vector>

#include "api/params.hpp"
#include "api/tensor_checks.hpp"

namespace flashlin::detail {

// dims_to_logical[i] = logical dimension (0..3) that tensor dimension i maps to. A NULL tensor
// gives an absent StridedTensor.
StridedTensor strided(const DLTensor* t, const std::vector<int>& dims_to_logical);

inline const std::vector<int> kIdentity4 = {0, 1, 2, 3};

// The values of a 1-D int32/int64 tensor in host memory; `shape` describes the expected shape
// in messages (e.g. "[N + 1]").
std::vector<int64_t> read_host_integers(ArgumentChecker& check, const DLTensor* t, const char* arg,
                                        const char* shape);

// The sequences of a token tensor `tokens_arg` of `batch` rows of `time` tokens: one per batch
// row, or the spans of cu_seqlens ([N + 1], starting at 0, non-decreasing, ending at T; B == 1).
std::vector<SequenceSpan> sequence_spans(ArgumentChecker& check, const DLTensor* cu_seqlens,
                                         int64_t batch, int64_t time, const char* tokens_arg);

// The checks of the recurrence's entry points that the ops run through it (GateLoop) share.
constexpr int kMaxChunkSize = 1024;

// config.form (its raw int: 0..2), config.chunk_size (0 or 1..kMaxChunkSize), config.scale.
void check_recurrence_config(ArgumentChecker& check, int form, int32_t chunk_size, double scale);

struct TokenSizes {
  int64_t batch = 0, time = 0, heads = 0, key_dim = 0, value_dim = 0;
};
// q, k [B, T, H, K] and v [B, T, H, V], one floating dtype, K in 1..max_key (max_key_cuda for
// CUDA tensors; `key_note` is added to the message of a K past it), V in 1..max_value.
TokenSizes check_qkv(ArgumentChecker& check, const DLTensor* q, const DLTensor* k,
                     const DLTensor* v, int64_t max_key, int64_t max_key_cuda, const char* key_note,
                     int64_t max_value);

}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_SEQUENCES_HPP_
