"""Continue a prompt with a trained language model: `python -m experiments.generate run=<run dir> prompt="..."`.

Keys (`key=value`, as Hydra overrides):
    run             the run directory of a WikiText-103-domain training (holds metrics.json or .hydra/config.yaml,
                    and checkpoints/)
    prompt          words separated by spaces, as in the corpus (unknown words become <unk>)
    max_new_tokens  tokens to draw (default 50)
    temperature     softmax temperature, > 0; exactly 0 draws the most likely word (greedy) (default 1.0)
    top_k           draw among the k most likely words only, k >= 1 (default null: all)
    max_context     the most tokens the model sees (default null: the run's data.tokens_per_sample, the positions it
                    was trained on). A longer sequence continues from its last max_context tokens, in every mode;
                    a larger value lets the sequence run past the trained positions (a warning says so)
    seed            seeds the draws (default 0)
    checkpoint      best | last (default best)
    mode            auto | incremental | recompute (default auto: flow attention runs in its recurrent step mode,
                    softmax with a key/value cache, other attentions recompute the sequence for each token)
    device          cpu | cuda (default cpu)

The run folder is all it needs: the config (metrics.json or .hydra/), the checkpoint, and the dictionary the run
was trained with, which training saves as `<run>/dict.txt` (its sha256 is checked against `dict.txt.sha256` and
metrics.json). Runs from before that have no dict.txt: the error names the command that copies it from the data
cache. The continuation is printed with `</s>` as line breaks.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from results.recipe import register_resolvers
from results.run_record import CHECKPOINT_DIR, METRICS_FILE, recorded_config
from tasks.wikitext103.cache import cache_dir_of
from tasks.wikitext103.data import model_dims_of
from tasks.wikitext103.dictionary import BOS, EOS, PAD, RUN_DICTIONARY, Dictionary, RunDictionaryError, load_from_run
from tasks.wikitext103.generation import MODES, check_options, generate

register_resolvers()
log = logging.getLogger("flowformer.generate")


@dataclass
class GenerateConfig:
    run: str = "???"
    prompt: str = ""
    max_new_tokens: int = 50
    temperature: float = 1.0
    top_k: int | None = None
    max_context: int | None = None
    seed: int = 0
    checkpoint: str = "best"
    mode: str = "auto"
    device: str = "cpu"


USAGE = ("usage: python -m experiments.generate run=<run dir> prompt=\"...\" [max_new_tokens=N] [temperature=T] "
         "[top_k=K] [max_context=C] [seed=S] [checkpoint=best|last] [mode=auto|incremental|recompute] "
         "[device=cpu|cuda]")
# taken as written: a prompt is free text, not a YAML value ("a: b", "[x]" and "null" stay words)
VERBATIM_KEYS = ("run", "prompt")


def parse_args(argv: list[str]) -> GenerateConfig:
    """`key=value` arguments over the defaults; unknown keys and wrong types raise with the key's name."""
    overrides = {}
    for argument in argv:
        key, separator, value = argument.partition("=")
        if not separator:
            raise SystemExit(f"{argument!r} is not key=value; {USAGE}")
        verbatim = value.replace("${", "\\${")  # OmegaConf would read ${...} as an interpolation
        overrides[key] = verbatim if key in VERBATIM_KEYS else OmegaConf.from_dotlist([argument])[key]
    cfg = OmegaConf.merge(OmegaConf.structured(GenerateConfig), overrides)
    if OmegaConf.is_missing(cfg, "run"):
        raise SystemExit(USAGE)
    if cfg.mode not in MODES:
        raise SystemExit(f"mode={cfg.mode!r}; expected one of {', '.join(MODES)}")
    try:
        check_options(temperature=cfg.temperature, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
                      max_context=cfg.max_context)
    except ValueError as error:
        raise SystemExit(f"{error}; {USAGE}") from None
    return OmegaConf.to_object(cfg)


def run_config(run_dir: Path) -> tuple[DictConfig, dict[str, Any]]:
    """The run's resolved config and data record: from metrics.json when the run finished, else from .hydra/."""
    recorded = recorded_config(run_dir)
    if recorded is not None:
        return recorded
    raise SystemExit(f"{run_dir} holds neither {METRICS_FILE} nor .hydra/config.yaml; pass the run directory of a "
                     "training (experiments/runs/wikitext103/...)")


def load_dictionary(cfg: DictConfig, run_dir: Path, data_record: dict[str, Any]) -> Dictionary:
    """The dictionary saved in the run folder, checked against the checksum that metrics.json records."""
    try:
        dictionary = load_from_run(run_dir)
    except FileNotFoundError:
        data_dir, dataset = Path(cfg.data.data_dir), cfg.data.dataset
        cache = cache_dir_of(data_dir, dataset) / "dict.txt"
        raise SystemExit(
            f"{run_dir / RUN_DICTIONARY} is missing: this run was trained before runs saved their dictionary. Copy it "
            f"from the training data's token cache: `cp {cache} {run_dir}/` (its sha256 is checked against the run's "
            f"metrics.json). If that cache is gone, rebuild it from the corpus first: `python -m "
            f"tasks.wikitext103.download --dataset {dataset} --data-dir {data_dir} --check`"
        ) from None
    except RunDictionaryError as error:
        raise SystemExit(str(error)) from None
    recorded = data_record.get("dictionary_sha256")
    if recorded and recorded != dictionary.sha256:
        raise SystemExit(f"{run_dir / RUN_DICTIONARY} (sha256 {dictionary.sha256[:12]}...) is not the dictionary this "
                         f"run was trained with ({METRICS_FILE} records {recorded[:12]}...); copy the training data's "
                         f"{cache_dir_of(Path(cfg.data.data_dir), cfg.data.dataset) / 'dict.txt'} into {run_dir}")
    return dictionary


def load_model(cfg: DictConfig, run_dir: Path, checkpoint: str, device: str, dictionary: Dictionary) -> torch.nn.Module:
    """The trained network (eval mode) for `dictionary`, from the run's checkpoint."""
    model = instantiate(cfg.model, **model_dims_of(dictionary), _convert_="all")
    path = run_dir / CHECKPOINT_DIR / f"{checkpoint}.ckpt"
    if not path.is_file():
        raise SystemExit(f"no checkpoint {path}; checkpoint=best|last picks another one")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")})
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = Path(args.run)
    cfg, data_record = run_config(run_dir)
    dictionary = load_dictionary(cfg, run_dir, data_record)
    model = load_model(cfg, run_dir, args.checkpoint, args.device, dictionary)
    # the stream starts with </s>, as every training and evaluation stream does
    prompt = torch.tensor([[EOS, *dictionary.encode_line(args.prompt)[:-1]]], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    trained = int(cfg.data.tokens_per_sample)
    max_context = trained if args.max_context is None else args.max_context
    if max_context > trained and prompt.shape[1] + args.max_new_tokens > trained:
        log.warning("max_context=%d: positions past %d (data.tokens_per_sample of this run) were never trained; "
                    "the continuation past them is out of the model's training distribution", max_context, trained)
    tokens = generate(model, prompt, args.max_new_tokens, mode=args.mode, temperature=args.temperature,
                      top_k=args.top_k, generator=generator, banned=(BOS, PAD), max_context=max_context)
    text = dictionary.decode(tokens[0, prompt.shape[1] :].tolist())
    print(f"{args.prompt} {text}".strip())
    return text


if __name__ == "__main__":
    main()
