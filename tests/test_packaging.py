"""The top-level ``kernels/`` folder is the ``vtc.kernels`` package, in an editable install and in a wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vtc.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_the_distribution_name_is_free_of_the_unrelated_vtc_project():
    """``vtc`` on the package index is another project: vtc is distributed as ``vtc-compress`` (import name ``vtc``),
    and every install hint says so."""
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["name"] == "vtc-compress"
    assert "pip install 'vtc-compress[all]'" in (ROOT / "README.md").read_text(encoding="utf-8")
    for path in [*ROOT.glob("vtc/**/*.py"), *ROOT.glob("docs/**/*.md"), ROOT / "README.md"]:
        assert not re.search(r"pip install '?vtc[\[' ]", path.read_text(encoding="utf-8")), path


def test_editable_install_maps_kernels():
    assert Path(vtc.kernels.__file__).resolve().parent == ROOT / "kernels"


@pytest.mark.slow
def test_built_wheel_contains_and_imports_vtc_kernels(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("vtc_compress-*.whl")  # the distribution is vtc-compress; the import name vtc
    names = zipfile.ZipFile(wheel).namelist()
    assert "vtc/kernels/__init__.py" in names and "vtc/kernels/reference.py" in names
    assert "vtc/py.typed" in names and "vtc/assets/grace_hopper.jpg" in names
    assert not any(n.startswith("kernels/") for n in names)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = "import vtc, vtc.kernels, sys; print(vtc.kernels.__file__); print(len(vtc.list_methods()))"
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    path = out.stdout.splitlines()[0]
    assert path.startswith(str(site)), path
