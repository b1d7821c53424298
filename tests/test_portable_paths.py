"""Paths in run records travel: written relative to the runs and data roots or a package, read back as local paths."""
from pathlib import Path

import aeon

from results.portable_paths import PathPortability, absolute_paths, local_path, local_paths


def test_paths_below_a_root_or_in_a_package_are_written_portably_and_read_back(tmp_path, monkeypatch):
    runs, data = tmp_path / "runs", tmp_path / "data"
    portable = PathPortability(runs, data)
    bundled = Path(aeon.__file__).parent / "datasets" / "data" / "JapaneseVowels" / "JapaneseVowels_TRAIN.ts"
    record = {"run_dir": str(runs / "uea/x/seed0"), "data": {"train_path": str(bundled), "root": str(data)},
              "config": {"paths": {"data_dir": "data"}, "trainer": {"devices": "cuda:0", "accelerator": "gpu"}},
              "elsewhere": "/mnt/other/file.ts"}
    written = portable.rewrite(record)
    assert written["run_dir"] == "$RUNS_DIR/uea/x/seed0" and written["data"]["root"] == "$DATA_DIR"
    assert written["data"]["train_path"] == "aeon:datasets/data/JapaneseVowels/JapaneseVowels_TRAIN.ts"
    assert written["config"] == record["config"]  # relative paths and other strings stay as they are
    assert absolute_paths(written) == ["record.elsewhere: /mnt/other/file.ts"]  # below no root: kept, and reported
    monkeypatch.setenv("RUNS_DIR", "/scratch/runs")
    monkeypatch.delenv("DATA_DIR", raising=False)
    back = local_paths(written)
    assert back["run_dir"] == "/scratch/runs/uea/x/seed0" and back["data"]["root"] == "data"
    assert back["data"]["train_path"] == str(bundled) and Path(back["data"]["train_path"]).is_file()
    assert local_path("cuda:0") == "cuda:0" and local_path("https://x.org/a/b") == "https://x.org/a/b"
