"""Builds `internlm2._C` by driving CMake (Ninja), as vLLM does.

Knobs (environment variables):
  INTERNLM2_SKIP_CUDA=1     build the CPU kernels only
  INTERNLM2_CUDA_ARCHS      CUDA architectures to build, e.g. "80;90a" (*_sm90.cu files only for 90a). Unset:
                            CUDA kernels only when a GPU is visible, for its architecture (see
                            internlm2/_build_plan.py, which also prints the plan: python internlm2/_build_plan.py)
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


def _load_build_plan():
    # By path: importing the package would try to load the extension this build is about to make.
    spec = importlib.util.spec_from_file_location("internlm2_build_plan", ROOT / "internlm2" / "_build_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


build_plan = _load_build_plan()


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

        cuda_home = build_plan.find_cuda_home()
        plan = build_plan.decide(os.environ, torch.version.cuda, cuda_home, build_plan.find_visible_gpu())
        with_cuda, archs = plan.with_cuda, plan.cuda_archs
        jobs = build_plan.compile_jobs()
        print(plan.describe(jobs, os.cpu_count() or 1), flush=True)

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

        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, env=env, check=True)
        subprocess.run(
            ["cmake", "--build", ".", "--target", "_C", "-j", str(jobs)], cwd=build_dir, env=env, check=True
        )
        # Recorded beside the extension so `import internlm2` can say which torch it was built for even
        # when the shared library cannot be loaded at all (undefined symbols from another torch).
        meta = {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_kernels": with_cuda,
            "cuda_archs": archs,
            "cuda_plan": plan.reason,
            "python": sys.version.split()[0],
        }
        (ext_path.parent / BUILD_META).write_text(json.dumps(meta, indent=1) + "\n")


setup(ext_modules=[CMakeExtension("internlm2._C")], cmdclass={"build_ext": CMakeBuild})
