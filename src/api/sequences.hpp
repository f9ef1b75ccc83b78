// Shared by the C ABI entry points (recurrence_api.cpp, modules_api.cpp): the mapping of a
// DLTensor onto the four logical dimensions of a StridedTensor, and the sequences of token
// tensors (batch rows, or the packed spans of cu_seqlens) with the host integer tensors that
// describe them.
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

}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_SEQUENCES_HPP_
