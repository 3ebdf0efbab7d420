// Vectorised global memory access: a Pack of kVec elements moves with one instruction (16 bytes for
// kVec * sizeof(T) == 16; callers check alignment before choosing kVec > 1).
#pragma once

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

#include <cstdint>
#include <initializer_list>

// True when every pointer may be accessed through Pack<T, kVec> (its start is kVec-element aligned).
template <int kVec, typename T>
bool packs_aligned(std::initializer_list<const T*> ptrs) {
  for (const T* p : ptrs)
    if (reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * kVec) != 0) return false;
  return true;
}
