"""A wheel built from the repo carries the package data: the recipe configs, the metric scripts
and the model card template, and the installed package reads them with `importlib.resources`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE_DATA = [
    "nmsparse_hf/recipes/configs/vit_digits.yaml",
    "nmsparse_hf/recipes/configs/swin_digits.yaml",
    "nmsparse_hf/data/metric_scripts/accuracy.py",
    "nmsparse_hf/data/metric_scripts/top5_accuracy.py",
    "nmsparse_hf/export/templates/model_card.md",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps` of a copy of the source tree (the build writes build/ and egg-info
    next to the sources; the copy keeps the checkout clean)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "nmsparse_hf", src / "nmsparse_hf", ignore=shutil.ignore_patterns("__pycache__")
    )
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "-q", "-w", str(tmp / "dist"), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = (tmp / "dist").glob("nmsparse_hf-*.whl")
    return built


def test_wheel_holds_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in PACKAGE_DATA if name not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    # every YAML the recipes ship, and every non-Python file of the package, is in the wheel
    shipped = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "nmsparse_hf").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )
    assert any(name.endswith(".yaml") for name in shipped)
    assert [name for name in shipped if name not in names] == []


def test_installed_wheel_reads_its_configs(wheel, tmp_path):
    """Unpacked on its own (no checkout on the path), the package finds its shipped files."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys, nmsparse_hf\n"
        "from importlib import resources\n"
        "assert nmsparse_hf.__file__.startswith(sys.argv[1]), nmsparse_hf.__file__\n"
        "configs = resources.files('nmsparse_hf.recipes').joinpath('configs')\n"
        "print(sorted(p.name for p in configs.iterdir() if p.name.endswith('.yaml')))\n"
        "print(resources.files('nmsparse_hf.export').joinpath('templates', 'model_card.md')"
        ".read_text()[:0] + 'card ok')\n"
        "from nmsparse_hf.cli import main\n"
        "sys.exit(main(['schedule', str(configs.joinpath('vit_digits.yaml')), "
        "'--total-steps', '100']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "'vit_digits.yaml'" in lines[0] and "'swin_digits.yaml'" in lines[0]
    assert lines[1] == "card ok"
    assert lines[2].startswith("MDGF-exp: FF 1:8")
