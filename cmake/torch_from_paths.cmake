# A `torch` imported target assembled from the installed torch's own paths and flags, for one case only:
# a CPU-only build against a CUDA build of torch on a machine without the CUDA toolkit, where torch's
# cmake package refuses to load. Everything comes from the installed torch, nothing is guessed.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import torch, torch.utils.cpp_extension as c; print(';'.join(c.include_paths())); print(';'.join(c.library_paths())); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _torch_info OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
string(REPLACE "\n" ";" _torch_lines "${_torch_info}")
list(GET _torch_lines 0 _torch_includes_str)
list(GET _torch_lines 1 _torch_libdirs_str)
list(GET _torch_lines 2 _torch_cxx11_abi)
string(REPLACE "," ";" _torch_includes "${_torch_includes_str}")
string(REPLACE "," ";" _torch_libdirs "${_torch_libdirs_str}")

# The C++ standard torch was built for, read from its cmake package (the same number find_package would set).
file(STRINGS "${TORCH_CMAKE_PREFIX}/Torch/TorchConfig.cmake" _std_line REGEX "CXX_STANDARD [0-9]+")
string(REGEX MATCH "[0-9]+" _torch_std "${_std_line}")

add_library(torch INTERFACE IMPORTED)
set(_torch_libs "")
foreach(lib c10 torch_cpu torch)
  find_library(_lib_${lib} ${lib} PATHS ${_torch_libdirs} NO_DEFAULT_PATH REQUIRED)
  list(APPEND _torch_libs "${_lib_${lib}}")
endforeach()
set_target_properties(torch PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${_torch_includes}"
  INTERFACE_LINK_LIBRARIES "${_torch_libs}"
  INTERFACE_COMPILE_DEFINITIONS "_GLIBCXX_USE_CXX11_ABI=${_torch_cxx11_abi}"
  CXX_STANDARD "${_torch_std}")
set(TORCH_INSTALL_PREFIX "${_torch_libdirs}/..")
