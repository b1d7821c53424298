"""Long Range Arena (results/paper/official_code.md §2): data readers and datamodule, the ListOps generator, the official
tokenisers and learning-rate schedule, and `make data-lra` (tasks.lra.download)."""
