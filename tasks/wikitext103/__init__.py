"""Word-level language modelling on WikiText-103 (or any corpus in its layout), as fairseq sees it.

`dictionary.py` (fairseq's dictionary), `corpus.py` (where a corpus's splits are and how they are read),
`cache.py` (tokenise once into uint32 memory maps), `windows.py` (training blocks and fairseq-eval-lm's context
windows), `data.py` (the datamodule), `loss.py` (cross-entropy over the full vocabulary in chunks), `module.py` (the
LightningModule), `generation.py` (sampling), `download.py` (`make data-wikitext103`), `local_corpus.py` (a small
corpus in the same layout from text on this machine).
"""
