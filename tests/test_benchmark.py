"""The benchmark measures every rate it reports (a tiny size here: rates only, nothing asserted about speed) and
writes the machine's JSON and its section of the table."""

from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
from scripts import benchmark, reports


def test_measure_and_report(tmp_path):
    result = benchmark.measure("efficientnet-lite0", image_size=64, batch_size=2, repeats=1, device="cpu")
    rates = [key for key in result if key.endswith("_images_per_s")]
    expected = {"train_cached_images_per_s", "train_cached_ssim_images_per_s", "inference_images_per_s"}
    assert expected | {"train_cached_amp_images_per_s", "train_cached_ssim_amp_images_per_s"} <= set(rates)
    assert all(result[key] > 0 for key in rates)
    report = {"machine": benchmark.machine(), "date": "2026-12-01", "device": "cpu", "results": [result]}
    benchmark.write_report(report, tmp_path / "benchmarks", "test-machine")
    assert json.loads((tmp_path / "benchmarks" / "test-machine.json").read_text())["results"][0]["encoder"] == (
        "efficientnet-lite0"
    )
    table = (tmp_path / "benchmarks.md").read_text()
    assert (
        "## test-machine (cpu)" in table
        and "SSIM loss" in table
        and "train_amp" in table
        and "| efficientnet-lite0 | imagenet |" in table
    )
    benchmark.write_report(report, tmp_path / "benchmarks", "test-machine")  # a rerun replaces its section
    assert (tmp_path / "benchmarks.md").read_text().count("## test-machine (cpu)") == 1


def test_folder_settings_name_batch_workers_and_encoder_runtime():
    assert benchmark.folder_setting("16x2") == (16, 2, "auto")  # the bundle's default runtime
    assert benchmark.folder_setting("1x0:torch") == (1, 0, "torch")
    assert benchmark.folder_setting("1x0:onnxruntime") == (1, 0, "onnxruntime")
    for bad in ("16", "1x0:tensorrt", "ax0"):
        with pytest.raises(ValueError, match="--settings"):
            benchmark.folder_setting(bad)


def test_folder_auc_reads_the_class_from_each_files_folder():
    scores = {"t/NORMAL/a.jpeg": 0.1, "t/NORMAL/b.jpeg": 0.7, "t/PNEUMONIA/c.jpeg": 0.5, "t/PNEUMONIA/d.jpeg": 0.9}
    assert benchmark.folder_auc(scores, "NORMAL") == pytest.approx(0.75)  # 3 of the 4 (normal, abnormal) pairs
    assert benchmark.folder_auc(scores, "PNEUMONIA") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="--normal 'normal'"):
        benchmark.folder_auc(scores, "normal")  # no folder of that name: every file would be abnormal


def test_records_take_the_umask_mode_and_the_table_is_replaced_atomically(tmp_path, monkeypatch):
    """A record is readable as a plain ``open`` would have left it (not ``mkstemp``'s 0600), and the table of every
    machine's section is written through the atomic writer, as the machine's JSON is."""
    written = []
    atomic_path = reports.atomic_path

    @contextmanager
    def recorded(path):
        with atomic_path(path) as tmp:
            yield tmp
        written.append(Path(path).name)

    monkeypatch.setattr(reports, "atomic_path", recorded)
    monkeypatch.setattr(benchmark, "_table", lambda report: "| a table |\n")
    umask = os.umask(0o027)
    try:
        benchmark.write_report({"device": "cpu"}, tmp_path / "benchmarks", "test-machine")
    finally:
        os.umask(umask)
    assert written == ["test-machine.json", "benchmarks.md"]
    for path in (tmp_path / "benchmarks" / "test-machine.json", tmp_path / "benchmarks.md"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert "## test-machine (cpu)" in (tmp_path / "benchmarks.md").read_text()
