"""UEA multivariate time-series classification (the paper's §4.4 / Table 4).

Modules: `datasets` (facts about the ten datasets), `data` (reading, preprocessing, `UEADataModule`),
`download` (`python -m tasks.uea.download`, used by `make data-uea`). Nothing is imported here so that the
download CLI does not pay for torch/Lightning imports it does not need.
"""
