// Vectorised global memory access: a Pack of kVec elements moves with one instruction (16 bytes for
// kVec * sizeof(T) == 16; callers check alignment before choosing kVec > 1).
#pragma once

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};
