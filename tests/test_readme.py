"""The docs hold together: local links resolve, the README opens with setup, and no domain's detail was lost.

The top-level README keeps what every user needs; each domain's commands, key tables and quirks live in
`tasks/<domain>/README.md`. These tests fail when a link breaks, when the setup commands move, or when a domain README
drops a key table, a key or a quirk.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOMAINS = ("uea", "lra", "imagenet", "wikitext103", "d4rl")
DOCS = [README, REPO / "data" / "README.md", REPO / "results" / "README.md"] + sorted(
    (REPO / "tasks").glob("*/README.md")
)
LINE_WIDTH = 120

FENCED_BLOCK = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`]*`")
# [text](target) or [text](target "title"); an image ![alt](target) matches too, and must resolve as well
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_links(text: str) -> list[str]:
    """The targets of the Markdown links in `text`, leaving out fenced code blocks and code spans."""
    prose = CODE_SPAN.sub("", FENCED_BLOCK.sub("", text))
    return LINK.findall(prose)


def local_target(target: str) -> str | None:
    """The file part of a link that points into the repository, or None for a URL or an anchor of the same page."""
    if SCHEME.match(target):  # http:, https:, mailto:, ...
        return None
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    return path or None


def broken_links(doc: Path, root: Path = REPO) -> list[str]:
    """Each local link of `doc` that names no existing file or folder inside `root`, with the reason."""
    broken = []
    for target in markdown_links(doc.read_text(encoding="utf-8")):
        path = local_target(target)
        if path is None:
            continue
        if path.startswith("/"):
            broken.append(f"{target}: absolute; write it relative to {doc.relative_to(root)}")
            continue
        resolved = (doc.parent / path).resolve()
        if not resolved.is_relative_to(root):
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file or folder ({resolved.relative_to(root)})")
    return broken


def tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of `text` outside code blocks: each a list of rows, each row its stripped cells.

    The header row comes first; the `|---|` separator row is left out. A `|` inside a code span is not a cell border.
    """
    found, current = [], []
    for line in FENCED_BLOCK.sub("", text).splitlines() + [""]:
        if line.startswith("|"):
            masked = CODE_SPAN.sub(lambda span: span.group(0).replace("|", "\0"), line)
            cells = [cell.strip().replace("\0", "|") for cell in masked.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-{3,}:?", cell) for cell in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def key_tables(text: str) -> list[list[list[str]]]:
    """The tables whose first column is headed `key`."""
    return [table for table in tables(text) if table[0][0] == "key"]


def domain_readme(domain: str) -> str:
    path = REPO / "tasks" / domain / "README.md"
    assert path.is_file(), f"{path.relative_to(REPO)} is missing: each domain documents itself beside its code"
    return path.read_text(encoding="utf-8")


def test_the_link_finder_reads_links_and_skips_code_and_urls():
    text = (
        "See [the data](data/README.md#uea) and [site](https://example.org/x.md), ![fig](results/figures/a.png).\n"
        "Mail [us](mailto:a@b.c); [top](#setup); `[not a link](nowhere.md)` and\n"
        "```bash\necho '[nor this](nowhere.md)'\n```\n[spaced](tasks/uea/README%20x.md \"title\")\n"
    )
    targets = markdown_links(text)
    assert targets == ["data/README.md#uea", "https://example.org/x.md", "results/figures/a.png", "mailto:a@b.c",
                       "#setup", "tasks/uea/README%20x.md"]
    assert [local_target(t) for t in targets] == ["data/README.md", None, "results/figures/a.png", None, None,
                                                  "tasks/uea/README x.md"]


def test_the_docs_include_every_domain_readme():
    assert {doc.parent.name for doc in DOCS if doc.parent.parent.name == "tasks"} >= set(DOMAINS)


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(REPO)))
def test_every_local_link_resolves_from_the_file_that_holds_it(doc):
    assert doc.is_file()
    assert broken_links(doc) == [], f"broken links in {doc.relative_to(REPO)}"


def test_a_broken_or_escaping_link_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "here.md").write_text("x")
    doc = tmp_path / "docs" / "README.md"
    doc.write_text("[ok](../here.md) [gone](../gone.md) [out](../../shared/STYLE.md) [abs](/here.md) [u](https://x.y)")
    assert [entry.split(":")[0] for entry in broken_links(doc, root=tmp_path)] == ["../gone.md", "../../shared/STYLE.md", "/here.md"]


def test_the_readme_opens_with_make_install_then_make_test_then_the_demo():
    text = README.read_text(encoding="utf-8")
    first_block = FENCED_BLOCK.search(text)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(0).splitlines()[1:-1]]
    assert commands == ["make install", "make test"]
    usage = text.index("## Usage")
    positions = [text.find(marker) for marker in ("make install", "make test ", "make test-distributed", "make demo")]
    assert -1 not in positions and positions == sorted(positions) and positions[-1] < usage
    assert first_block.start() < text.index("make test-distributed") < text.index("make demo")


def test_the_readme_keeps_what_every_user_needs_and_no_domain_detail():
    text = README.read_text(encoding="utf-8")
    for needed in (
        "## Setup on a fresh machine", "## Usage", "### One command per paper table", "**Which runs fill a paper cell.**",
        "*The recipe fingerprint.*", "*Variants, never pooled.*", "*The paper's protocol per row.*",
        "### Single runs and sweeps (Hydra)", "### Many GPUs and clusters", "### Weights & Biases",
        "### Where runs and results go", "### Data", "### Adding a domain", "## The library", "## Layout",
        "## One environment", "## Protocol choices made explicit",
    ):
        assert needed in text, f"README.md lost {needed!r}"
    users_keys = [row[0] for table in key_tables(text) for row in table[1:]]
    for key in ("`experiment=<domain>/<Name>`", "`model/attention=<name>`", "`seed`", "`selection`", "`resume=true`",
                "`trainer.precision`", "`logger=csv|wandb|wandb_online`", "`hydra.run.dir=<path>`"):
        assert key in users_keys, f"README.md's table of keys users rely on lost {key}"
    for moved in ("### Long Range Arena", "### WikiText-103", "### ImageNet-1K", "### D4RL (Decision Transformer)"):
        assert moved not in text, f"{moved} belongs in its domain README, not in README.md"


def test_the_domains_table_links_each_domain_readme_with_its_command():
    (table,) = [t for t in tables(README.read_text(encoding="utf-8")) if t[0] == ["domain", "paper table", "command",
                                                                                 "details"]]
    rows = table[1:]
    assert len(rows) == len(DOMAINS)
    for domain, row in zip(DOMAINS, rows):
        assert row[2] == f"`make reproduce-{domain}`"
        assert f"(tasks/{domain}/README.md)" in row[3], f"the Domains row of {domain} does not link its README"


def test_each_protocol_choice_points_to_the_domain_readme_that_holds_its_detail():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Protocol choices made explicit"):]
    bullets = section.split("\n- ")[1:]
    unlinked = [b.split(".**")[0] for b in bullets if not re.search(r"\]\(tasks/[a-z0-9]+/README\.md\)", b)]
    assert len(bullets) >= 6
    assert unlinked == ["**Padding in attention"]  # it holds in every op of every domain


@pytest.mark.parametrize("domain", DOMAINS)
def test_each_domain_readme_opens_with_its_title_and_what_it_reproduces(domain):
    text = domain_readme(domain)
    title, opening = text.split("\n\n", 2)[:2]
    opening = " ".join(opening.split())
    assert re.fullmatch(r"# \S.*", title)
    assert opening.startswith("This domain reproduces the paper's ")
    assert f"`make reproduce-{domain}`" in opening
    assert "relative to the repository root" in opening


# What each domain README must keep: every key of its key tables, the tables' headers, its commands and its quirks.
DOMAIN_CONTENT = {
    "uea": {
        "key_headers": [["key", "meaning (default)"]],
        "keys": ["`data.dataset`", "`selection`", "`data.val_fraction`", "`data.batch_size`", "`trainer.max_epochs`",
                 "`trainer.check_val_every_n_epoch`", "`+data.train_file_pattern`"],
        "text": ["make data-uea", "make demo", "make reproduce-uea", "experiment=uea/base data.dataset=BasicMotions",
                 "**Selection on the test set.**", "**UEA padding.**", "JapaneseVowels loses steps 27–29",
                 "**UEA SpokenArabicDigits**", "Adam optimiser", "**Bundled datasets.**", "aeon's bundled copies",
                 "**No clamp.**"],
    },
    "lra": {
        "key_headers": [["key", "meaning (default)"]],
        "keys": ["`data.dataset`", "`model/attention`", "`data.batch_size`", "`trainer.val_check_interval`",
                 "`trainer.max_steps`", "`data.max_len`", "`selection`", "`data.holdout_fraction`",
                 "`data.split_seed`", "`data.pad_to`", "`data.text_source`"],
        "text": ["make listops", "make data-lra", "model/attention=flow_lra_official", "data.max_len=4000",
                 "The paper's LRA batch sizes are global", "`EXTRA=selection=holdout_val` runs the rigorous protocol",
                 "**LRA attention.**"],
    },
    "wikitext103": {
        "key_headers": [["key", "meaning (paper value)"]],
        "keys": ["`model.d_model`, `model.n_layers`, `model.n_heads`, `model.d_ff`", "`data.tokens_per_sample`",
                 "`data.context_window`", "`data.val_context_window`", "`data.batch_size`", "`module.warmup_updates`",
                 "`module.fp32_eval`", "`trainer.max_steps`", "`data.dataset`"],
        "text": ["make data-wikitext103", "python -m experiments.generate", "python -m tasks.wikitext103.local_corpus",
                 "is fairseq's `transformer_lm`", "**Precision.**", "- **Evaluation** follows `fairseq-eval-lm",
                 "- **Memory.**", "- **Generation.**", "*The run folder is enough.*", "*Context.*", "*Options.*",
                 "- **Evidence that it learns.**", "- **Reformer**"],
    },
    "imagenet": {
        "key_headers": [["key", "meaning (paper value)"]],
        "keys": ["`data.dataset`", "`data.image_size`", "`data.batch_size`",
                 "`model.dims`, `model.depths`, `model.heads`", "`module.lr`", "`module.warmup_epochs`",
                 "`data.mixup`, `data.cutmix`", "`trainer.max_epochs`", "`data.repeated_aug`",
                 "`data.train_transform.re_prob`", "`module.ema_decay`", "`data.check_images`",
                 "`data.corrupt_images`"],
        "text": ["make data-imagenet", "python -m experiments.profile", "python -m tasks.imagenet.digits",
                 "The last command trains a 1.4 M-parameter hierarchical Flowformer", "The network (",
                 "| network | attention | params (M) | GMACs | of which attention | paper: params, GFLOPs |",
                 "| DeiT-S | softmax | 22.05 | 4.60 | 0.36 | 22, 4.6 |", "- **43.31 M against the paper's 41 M.**",
                 "- **Heads.**", "- **Flow-Attention variant.**", "- **Colour jitter 0.4**", "- **Pillow 13**",
                 "- **What each column runs.**", "- **Left different from the published runs**",
                 "- **The image check runs once per folder**", "- **A truncated JPEG**", "- **Throughput**"],
    },
    "d4rl": {
        "key_headers": [["key", "meaning (default)"]],
        "keys": ["`data.dataset`", "`data.source`", "`data.reward_check`", "`data.padding`", "`eval.episodes`",
                 "`eval.final_episodes`", "`eval.targets`", "`eval.report_target`", "`eval.num_envs`",
                 "`eval.max_episode_steps`", "`eval.env_version`", "`eval.vectorization`",
                 "`eval.seed`, `eval.test_seed`", "`module.fp32_eval`"],
        "text": ["make data-d4rl", "preset=d4rl/dt_kzl", "python -m tasks.d4rl.collect", "data.source=minari",
                 "python -m experiments.d4rl_eval_bench", "The recipe (`conf/task/d4rl.yaml`",
                 "Every 10k steps the policy is evaluated in real MuJoCo", "`<run dir>/evaluations.jsonl`",
                 "- **Reformer**"],
    },
}


@pytest.mark.parametrize("domain", DOMAINS)
def test_each_domain_readme_keeps_its_key_tables_commands_and_quirks(domain):
    text = domain_readme(domain)
    expected = DOMAIN_CONTENT[domain]
    found = key_tables(text)
    assert [table[0] for table in found] == expected["key_headers"]
    keys = [row[0] for table in found for row in table[1:]]
    missing = [key for key in expected["keys"] if key not in keys]
    assert missing == [], f"tasks/{domain}/README.md lost these keys from its key table"
    flat = " ".join(text.split())  # moved paragraphs may be wrapped differently
    lost = [snippet for snippet in expected["text"] if " ".join(snippet.split()) not in flat]
    assert lost == [], f"tasks/{domain}/README.md lost these commands or quirks"


@pytest.mark.parametrize("doc", [README] + [REPO / "tasks" / d / "README.md" for d in DOMAINS],
                         ids=lambda doc: str(doc.relative_to(REPO)))
def test_prose_fits_the_line_width(doc):
    prose = FENCED_BLOCK.sub("", doc.read_text(encoding="utf-8"))
    long = [line for line in prose.splitlines() if len(line) > LINE_WIDTH and not line.startswith("|")]
    assert long == [], f"{doc.relative_to(REPO)}: prose lines over {LINE_WIDTH} characters"
