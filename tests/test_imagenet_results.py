"""The ImageNet table from the repository's manifest: top-1 and top-5 accuracy, parameters and GMACs
filled from run records; the model-size rows are shown beside the paper's but never scored."""

from __future__ import annotations

from tests.helpers import csv_row, md_line, read_csv, run_cli, write_run

RUN_METRICS = {"test/acc": 0.80, "test/acc_top5": 0.95, "last/val/acc": 0.79, "test/params_M": 43.311304,
               "test/gmacs": 6.885}


def test_runs_fill_accuracy_and_model_size_rows(tmp_path):
    runs = tmp_path / "runs"
    heads = {"model": {"attention": {"name": "flow"}, "heads": 12}}
    write_run(runs, "imagenet/hierarchical", "flow", 0, 80.0, config=heads, metrics=RUN_METRICS)
    write_run(runs, "imagenet/deit_small", "softmax", 0, 79.0,
              metrics={**RUN_METRICS, "test/params_M": 22.050664, "test/gmacs": 4.599})
    rc, out = run_cli(tmp_path)
    rows = read_csv(out / "imagenet.csv")
    params = "params_M (table header says MB)"
    expected = {("top1_acc", "Flowformer"): (80.0, 80.6), ("top5_acc", "Flowformer"): (95.0, 94.9),
                (params, "Flowformer"): (43.311304, 41.0), ("flops_G", "Flowformer"): (6.885, 6.3),
                (params, "DeiT-S"): (22.050664, 22.0)}
    for (row, model), (ours, paper) in expected.items():
        cell = csv_row(rows, row, model)
        assert (float(cell["mean"]), float(cell["paper"])) == (ours, paper)
    markdown = (out / "imagenet.md").read_text()
    assert md_line(markdown, "flops_G")[1:3] == ["6.88 (1)", "6.3"]
    # scored: top-1 and top-5 of the 8 columns (4 filled, all within 1 point); the size rows are not
    assert "4 of 16 cells within" in markdown and "describe the models and are not compared" in markdown


def test_a_corrected_heads_run_is_not_pooled_with_the_official_one(tmp_path, capsys):
    corrected = {"model": {"attention": {"name": "flow"}, "heads": [6, 12, 12, 12]}}
    write_run(tmp_path / "runs", "imagenet/hierarchical", "flow", 0, 81.0, config=corrected, metrics=RUN_METRICS)
    rc, out = run_cli(tmp_path)
    assert csv_row(read_csv(out / "imagenet.csv"), "top1_acc", "Flowformer")["n"] == "0"
    assert "model.heads=[6, 12, 12, 12] (recipe: 12)" in (tmp_path / "README.md").read_text()
