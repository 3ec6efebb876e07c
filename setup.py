"""Builds the native extension (CMakeLists.txt -> vlv_engine/native/_preprocess*.so)
during `pip install .` / `pip install -e .`.  Everything else is in pyproject.toml.

setuptools stays the build backend because it installs `training/` as `vlv_training`
in editable mode with live sources; scikit-build-core cannot rename a package
directory.  This file is the usual setuptools route to a CMake project: one cmake
configure + build + install, whose modules are copied where setuptools expects them.

Environment:
  VLV_NATIVE=0        skip the native build (the package then uses Pillow + torch
                      and logs a notice)
  VLV_NATIVE_CUDA=1   also build the CUDA kernels (needs nvcc; see README)
  CMAKE_ARGS          extra arguments for the cmake configure step
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "off", "no")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Runs CMake once for all CMakeExtensions and places each built module at
    the path setuptools chose for it."""

    def run(self) -> None:
        self._built: Path | None = None
        # Editable installs copy the module into the source tree, overwriting the
        # file in place, which crashes processes that have it loaded: unlink it first
        # (they keep the old inode).
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        for ext in self.extensions:
            if isinstance(ext, CMakeExtension):
                ROOT.joinpath(*ext.name.split(".")).with_name(ext.name.rsplit(".", 1)[-1] + suffix).unlink(
                    missing_ok=True)
        super().run()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        built = self._cmake_build()
        name = ext.name.rsplit(".", 1)[-1]
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        source = built / "vlv_engine" / "native" / f"{name}{suffix}"
        if not source.exists():
            found = sorted(p.name for p in (built / "vlv_engine" / "native").glob("*"))
            raise RuntimeError(f"CMake did not produce {source.name} (found: {found})")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copy then rename: processes that have the old module loaded keep its inode
        # (overwriting a mapped shared library in place crashes them).
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)

    def _cmake_build(self) -> Path:
        if self._built is not None:
            return self._built
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building the native extension needs cmake >= 3.18 on PATH (e.g. `pip install "
                               "cmake`); or set VLV_NATIVE=0 to install without it")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        prefix = Path(tempfile.mkdtemp(prefix="vlv-native-"))
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_INSTALL_PREFIX={prefix}",
            f"-DVLV_NATIVE_CUDA={'ON' if _flag('VLV_NATIVE_CUDA', False) else 'OFF'}",
        ]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args.append("-GNinja")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        subprocess.run([cmake, "--install", str(build_dir)], check=True)
        self._built = prefix
        return prefix


def _extensions() -> list[Extension]:
    if not _flag("VLV_NATIVE", True):
        # A module left in the source tree by an earlier editable install would
        # still be imported: remove it, so that the install really has none.
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        for name in ("_preprocess", "_gemv", "_preprocess_cuda"):
            (ROOT / "vlv_engine" / "native" / f"{name}{suffix}").unlink(missing_ok=True)
        print("VLV_NATIVE=0: not building the native extension", file=sys.stderr)
        return []
    modules = [CMakeExtension("vlv_engine.native._preprocess"), CMakeExtension("vlv_engine.native._gemv")]
    if _flag("VLV_NATIVE_CUDA", False):
        modules.append(CMakeExtension("vlv_engine.native._preprocess_cuda"))
    return modules


setup(ext_modules=_extensions(), cmdclass={"build_ext": CMakeBuild})
