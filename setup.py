"""Builds `internlm2._C` by driving CMake (Ninja), as vLLM does.

Knobs (environment variables):
  INTERNLM2_SKIP_CUDA=1     build the CPU kernels only
  INTERNLM2_CUDA_ARCHS      CUDA architectures, default "80;90a" (*_sm90.cu files only for 90a)
  MAX_JOBS                  parallel compile jobs (default: CPU count)
  NVCC_THREADS              threads per nvcc invocation (default 1)
  CUTLASS_PATH              a CUTLASS checkout/install whose include/ holds cutlass/ and cute/
  CUDA_HOME                 the CUDA toolkit (default: /usr/local/cuda, then the nvcc on PATH)
  INTERNLM2_BUILD_TYPE      CMake build type, default Release
  INTERNLM2_WERROR=0        report warnings in the project's own sources without failing the build
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str, default: bool = False) -> bool:
    return os.environ.get(name, "1" if default else "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> Path | None:
    """The toolkit to build with. Decided by nvcc on disk, never by torch.cuda.is_available()."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists():
            return Path(c)
    return None


def _find_cutlass_include() -> Path | None:
    if os.environ.get("CUTLASS_PATH"):
        root = Path(os.environ["CUTLASS_PATH"])
        for inc in (root / "include", root):
            if (inc / "cute" / "tensor.hpp").exists():
                return inc
        raise RuntimeError(f"CUTLASS_PATH={root} has no include/cute/tensor.hpp")
    # The nvidia-cutlass wheel ships the headers under cutlass_library/source/include. find_spec avoids
    # importing cutlass_library, which pulls in its kernel generator.
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.submodule_search_locations:
        inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
        if (inc / "cute" / "tensor.hpp").exists():
            return inc
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


BUILD_META = "_build_meta.json"


class CMakeBuild(build_ext):
    def copy_extensions_to_source(self) -> None:
        # In-place (editable) builds: the build metadata travels with the extension module.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            shutil.copyfile(Path(regular_file).parent / BUILD_META, Path(inplace_file).parent / BUILD_META)

    def build_extension(self, ext: CMakeExtension) -> None:
        import torch

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A fixed build directory (not setuptools' temporary one), so `pip install -e .`, `pip wheel .` and
        # `setup.py build_ext --inplace` all rebuild incrementally: touching one .cu recompiles only it.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)

        skip_cuda = _env_flag("INTERNLM2_SKIP_CUDA")
        cuda_home = _find_cuda_home()
        with_cuda = not skip_cuda and cuda_home is not None and torch.version.cuda is not None
        if not skip_cuda and not with_cuda:
            why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc was not found"
            print(f"internlm2: building CPU kernels only ({why}); set CUDA_HOME to build CUDA kernels")
        archs = os.environ.get("INTERNLM2_CUDA_ARCHS", "80;90a")

        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('INTERNLM2_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DINTERNLM2_OUTPUT_DIR={ext_path.parent}",
            f"-DINTERNLM2_OUTPUT_NAME={ext_path.name}",
            f"-DINTERNLM2_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DNVCC_THREADS={os.environ.get('NVCC_THREADS', '1')}",
            f"-DINTERNLM2_WERROR={'ON' if _env_flag('INTERNLM2_WERROR', default=True) else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        if torch.version.cuda is not None:
            if cuda_home is None:
                # Torch's cmake package insists on a CUDA toolkit when torch is a CUDA build; without
                # one (a CPU-only build on a laptop) the torch target is assembled from its paths.
                args.append("-DINTERNLM2_TORCH_CMAKE_PACKAGE=OFF")
            else:
                args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCUDAToolkit_ROOT={cuda_home}"]
        if with_cuda:
            cutlass = _find_cutlass_include()
            if cutlass is None:
                raise RuntimeError(
                    "CUDA kernels need the CUTLASS/CuTe headers: "
                    "`pip install --no-deps nvidia-cutlass==4.2.0.0` or set CUTLASS_PATH "
                    "(or INTERNLM2_SKIP_CUDA=1 for a CPU-only build)"
                )
            args += [
                f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
                f"-DINTERNLM2_CUDA_ARCHS={archs}",
                f"-DCUTLASS_INCLUDE_DIR={cutlass}",
            ]
        # torch's cmake reads CUDA_HOME; point it at the toolkit we chose, not at a stray nvcc on PATH.
        env = dict(os.environ)
        if cuda_home is not None:
            env["CUDA_HOME"] = str(cuda_home)

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, env=env, check=True)
        subprocess.run(
            ["cmake", "--build", ".", "--target", "_C", "-j", jobs], cwd=build_dir, env=env, check=True
        )
        # Recorded beside the extension so `import internlm2` can say which torch it was built for even
        # when the shared library cannot be loaded at all (undefined symbols from another torch).
        meta = {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_kernels": with_cuda,
            "cuda_archs": archs if with_cuda else "",
            "python": sys.version.split()[0],
        }
        (ext_path.parent / BUILD_META).write_text(json.dumps(meta, indent=1) + "\n")


setup(ext_modules=[CMakeExtension("internlm2._C")], cmdclass={"build_ext": CMakeBuild})
