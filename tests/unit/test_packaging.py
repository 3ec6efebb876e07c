"""The installed package list must cover every source folder."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = {"vlv_engine": "vlv_engine", **{k: v for k, v in cfg["package-dir"].items()}}
    found = set()
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join((name, *rel.parts)) if rel.parts else name)
    assert found == listed


def test_importing_the_package_is_cheap():
    import subprocess
    import sys

    code = "import sys, vlv_engine; print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_build_never_installs_torch():
    # A torch build requirement makes pip install a multi-GB CUDA torch into the
    # isolated build environment; the native extension is built on raw buffers.
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    names = [req.split(";")[0].replace(" ", "").lower() for req in build["requires"]]
    assert not [n for n in names if n.startswith(("torch", "pytorch"))], names
    assert any(n.startswith("nanobind") for n in names)


def test_native_extension_sources_are_not_an_importable_kernels_package():
    # diffusers imports a `kernels` package: the top-level kernels/ folder holds C++/CUDA
    # sources only, the Python import path is vlv_engine.native.
    assert (ROOT / "CMakeLists.txt").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert not list((ROOT / "kernels").rglob("*.py"))
