"""A plain Accelerate loop with only NMSparsifier learns real data and ends N:M."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_plain_accelerate_loop_learns_digits_and_ends_nm(tmp_path):
    path = Path(__file__).parents[1] / "examples" / "plain_loop.py"
    spec = importlib.util.spec_from_file_location("plain_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(epochs=6, output_dir=str(tmp_path / "plain"))
    assert result["accuracy"] > 0.7  # chance is 0.1
    report = result["report"]
    assert report.ok and len(report.layers) == 4  # the saved checkpoint's verification
    assert all(check.sparsity == 0.75 for check in report.layers)
    assert result["checkpoint"] == str(tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").is_file()  # saved through save_sparse_pretrained
