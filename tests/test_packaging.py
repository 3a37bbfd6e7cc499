"""The source distribution carries everything the extension needs to compile.

setuptools copies an Extension's listed sources into the sdist but not the headers they include, so an
sdist without MANIFEST.in builds nowhere (and `python -m build` builds the wheel from that sdist).
"""
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def csrc_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu"))


def test_every_quoted_include_is_a_csrc_file():
    """The sdist check below covers the headers only if each `#include "x"` names a file under csrc/."""
    for rel in csrc_files():
        path = ROOT / rel
        for inc in re.findall(r'#include\s+"([^"]+)"', path.read_text()):
            assert (path.parent / inc).resolve().is_file(), f'{rel}: #include "{inc}" not found'
            assert (path.parent / inc).resolve().is_relative_to(ROOT / "csrc"), f"{rel}: {inc} outside csrc/"


def build_sdist(root: Path, out: Path) -> set[str]:
    """The member paths (without the top folder) of the sdist built from a copy of ROOT's packaging inputs.

    A copy, so that setup.py's egg-info and build output never touch the checkout that others import."""
    src = out / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "build", "*.egg-info")
    for name in ("maskprune", "kernels", "csrc"):
        shutil.copytree(root / name, src / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        if (root / name).is_file():
            shutil.copy2(root / name, src / name)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out / "dist")], cwd=src,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "MASKPRUNE_NO_CUDA": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (archive,) = (out / "dist").glob("maskprune-*.tar.gz")
    with tarfile.open(archive) as tar:
        return {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}


def test_sdist_holds_every_extension_source_and_header(tmp_path):
    if not (ROOT / "setup.py").is_file():
        pytest.skip("not a source checkout")
    names = build_sdist(ROOT, tmp_path)
    missing = [f for f in csrc_files() if f not in names]
    assert not missing, f"sdist lacks {missing} (MANIFEST.in)"
    assert "maskprune/_C.cpython" not in " ".join(names), "a built .so leaked into the sdist"
