"""Generation: incremental decoding (flow's recurrent step mode, softmax's KV cache) equals recomputing the whole
sequence, the sampling options, and `python -m experiments.generate` on a trained run."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest
import torch

from experiments import generate as generate_cli
from experiments.train import train
from flowformer.models.transformer_lm import TransformerLM
from tasks.wikitext103.generation import generate, next_tokens, resolve_mode
from tests.fixtures.wikitext103 import write_fixture
from tests.helpers import compose_config


def tiny(name: str) -> TransformerLM:
    torch.manual_seed(0)
    options = {"name": name, "clamp": 5.0} if name.startswith("flow") else {"name": name}
    return TransformerLM(60, d_model=16, n_layers=2, n_heads=2, d_ff=32, attention=options).double().eval()


@pytest.mark.parametrize("name", ["flow", "flow_no_competition", "flow_no_allocation", "softmax"])
def test_incremental_hidden_states_equal_the_full_forward(name):
    model = tiny(name)
    tokens = torch.randint(4, 60, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        hidden, state = model.extend(tokens[:, :9])  # the prompt
        steps = [hidden]
        for t in range(9, 21):  # then one token at a time
            hidden, state = model.extend(tokens[:, t : t + 1], state)
            steps.append(hidden)
    assert state.length == 21
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["flow", "softmax"])
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.8, 5)])
def test_step_mode_generation_equals_recomputing(name, temperature, top_k):
    model = tiny(name)
    prompt = torch.randint(4, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    runs = {mode: generate(model, prompt, 15, mode=mode, temperature=temperature, top_k=top_k,
                           generator=torch.Generator().manual_seed(7)) for mode in ("incremental", "recompute")}
    assert runs["incremental"].shape == (2, 21)
    assert torch.equal(runs["incremental"], runs["recompute"])
    assert torch.equal(runs["incremental"][:, :6], prompt)


def test_flow_state_stays_constant_while_the_kv_cache_grows():
    sizes = {}
    for name in ("flow", "softmax"):
        model = tiny(name)
        with torch.no_grad():
            _, state = model.extend(torch.randint(4, 60, (1, 8)))
            short = state.nbytes()
            for _ in range(40):
                _, state = model.extend(torch.randint(4, 60, (1, 1)), state)
        sizes[name] = (short, state.nbytes())
    assert sizes["flow"][0] == sizes["flow"][1]
    assert sizes["softmax"][1] == sizes["softmax"][0] * 48 // 8


def test_modes_and_sampling_options():
    assert resolve_mode(tiny("flow"), "auto") == "incremental"
    assert resolve_mode(tiny("linear"), "auto") == "recompute"
    with pytest.raises(ValueError, match="mode=recompute"):
        resolve_mode(tiny("performer"), "incremental")
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(200, 1)
    assert next_tokens(logits, temperature=0.0).unique().tolist() == [1]
    assert next_tokens(logits, temperature=0.0, banned=[1]).unique().tolist() == [3]
    drawn = next_tokens(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3}


def record_positions(model: TransformerLM) -> list[int]:
    """The end (one past the last position) of every run of positions the model embeds, appended as it runs."""
    ends: list[int] = []
    model.embed_positions.register_forward_pre_hook(lambda _, args, kwargs: ends.append(args[0] + args[1]),
                                                    with_kwargs=True)  # fmt: skip
    return ends


@pytest.mark.parametrize("name", ["flow", "softmax"])
@pytest.mark.parametrize("prompt_length", [5, 12])
def test_past_max_context_every_mode_continues_from_the_last_window(name, prompt_length):
    """Once the sequence outgrows max_context (the trained positions), the next token is drawn from its last
    max_context tokens at positions 0..max_context-1, in the step mode as in recompute (nanoGPT's crop)."""
    model, window, steps = tiny(name), 8, 20
    prompt = torch.randint(4, 60, (2, prompt_length), generator=torch.Generator().manual_seed(2))
    tokens, draws = prompt, torch.Generator().manual_seed(5)
    with torch.no_grad():  # an independent reference: crop, run the whole window, draw
        for _ in range(steps):
            logits = model.logits(model(tokens[:, -window:])[:, -1])
            tokens = torch.cat([tokens, next_tokens(logits, 0.9, 6, draws)[:, None]], dim=1)
    ends = record_positions(model)
    for mode in ("incremental", "recompute"):
        ends.clear()
        drawn = generate(model, prompt, steps, mode=mode, temperature=0.9, top_k=6, max_context=window,
                         generator=torch.Generator().manual_seed(5))  # fmt: skip
        assert torch.equal(drawn, tokens), mode
        assert max(ends) == window  # no position past the trained ones, in any mode


def test_without_max_context_the_step_mode_runs_past_the_trained_positions():
    model = tiny("flow")
    ends = record_positions(model)
    drawn = generate(model, torch.randint(4, 60, (1, 5)), 20, mode="incremental", max_context=None)
    assert drawn.shape == (1, 25) and max(ends) == 24  # the last drawn token is never fed back


@pytest.mark.parametrize("key, value", [("top_k", 0), ("top_k", -1), ("temperature", -0.5),
                                        ("temperature", float("nan")), ("max_new_tokens", -1), ("max_context", 0)])
def test_out_of_range_generation_options_are_errors_naming_the_option(key, value):
    options = {"max_new_tokens": 3, key: value}
    with pytest.raises(ValueError, match=key):
        generate(tiny("flow"), torch.randint(4, 60, (1, 4)), options.pop("max_new_tokens"), **options)
    with pytest.raises(SystemExit, match=key):
        generate_cli.parse_args(["run=r", f"{key}={value}"])


def test_temperature_zero_is_greedy_and_top_k_keeps_exactly_k():
    model, prompt = tiny("flow"), torch.randint(4, 60, (1, 4), generator=torch.Generator().manual_seed(3))
    greedy = generate(model, prompt, 6, temperature=0.0)
    with torch.no_grad():
        assert greedy[0, -1] == model.logits(model(greedy[:, :-1])[:, -1]).argmax(dim=-1)[0]
    tied = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]]).repeat(400, 1)  # three ids tie at the 2nd largest logit
    drawn = next_tokens(tied, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert len(set(drawn.tolist())) == 2 and 0 in drawn.tolist()


def test_generate_command_on_a_trained_run(tmp_path, capsys, caplog, monkeypatch):
    data_dir = tmp_path / "data"
    monkeypatch.setenv("DATA_DIR", str(data_dir))  # the record names $DATA_DIR/...: this machine's data root
    overrides = write_fixture(data_dir)
    cfg = compose_config([
        "experiment=wikitext103/transformer_lm", f"paths.data_dir={data_dir}", "logger=csv",
        "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "module.warmup_updates=1",
        *[f"{key}={value}" for key, value in overrides.items()],
    ])
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    capsys.readouterr()
    recorded = json.loads((run_dir / "metrics.json").read_text())["data"]["dictionary_sha256"]
    assert hashlib.sha256((run_dir / "dict.txt").read_bytes()).hexdigest() == recorded
    assert (run_dir / "dict.txt.sha256").read_text() == f"{recorded}  dict.txt\n"
    shutil.rmtree(data_dir)  # the corpus and its token cache are gone: the run folder is enough
    text = generate_cli.main([f"run={run_dir}", "prompt=the river", "max_new_tokens=7", "seed=3", "top_k=10"])
    printed = capsys.readouterr().out
    assert printed.startswith("the river") and len(text.split()) + text.count("\n") >= 7
    again = generate_cli.main([f"run={run_dir}", "prompt=the river", "max_new_tokens=7", "seed=3", "top_k=10",
                               "mode=recompute"])
    assert again == text  # the recurrent step mode draws what recomputing draws
    with pytest.raises(SystemExit, match="checkpoint"):
        generate_cli.main([f"run={run_dir}", "prompt=a", "checkpoint=missing"])

    # past the trained positions (data.tokens_per_sample=32): the context slides, the modes still agree
    long = {mode: generate_cli.main([f"run={run_dir}", "prompt=the river", "max_new_tokens=40", f"mode={mode}"])
            for mode in ("incremental", "recompute")}  # fmt: skip
    assert long["incremental"] == long["recompute"]
    limits = []
    monkeypatch.setattr(generate_cli, "generate", lambda *a, **k: limits.append(k["max_context"]) or generate(*a, **k))
    generate_cli.main([f"run={run_dir}", "prompt=a", "max_new_tokens=2"])
    with caplog.at_level(logging.WARNING, logger="flowformer.generate"):
        generate_cli.main([f"run={run_dir}", "prompt=a", "max_new_tokens=40", "max_context=64"])
    assert limits == [32, 64] and "never trained" in caplog.text

    saved = (run_dir / "dict.txt").read_text()
    (run_dir / "dict.txt").write_text(saved.replace("the ", "teh ", 1))  # edited after training
    with pytest.raises(SystemExit, match=r"dict\.txt .*is not the dictionary dict\.txt\.sha256 records"):
        generate_cli.main([f"run={run_dir}", "prompt=a"])
    (run_dir / "dict.txt.sha256").unlink()
    with pytest.raises(SystemExit, match=r"is not the dictionary this run was trained with \(metrics\.json records"):
        generate_cli.main([f"run={run_dir}", "prompt=a"])
    (run_dir / "dict.txt").unlink()  # a run from before the dictionary was saved with it
    cache = data_dir / "tiny-wiki" / "cache" / "dict.txt"
    with pytest.raises(SystemExit, match=rf"dict\.txt is missing.*`cp {cache} {run_dir}/`.*--check"):
        generate_cli.main([f"run={run_dir}", "prompt=a"])


def test_prompts_are_taken_as_written():
    for prompt in ("The river , in 1 @,@ 000 's", "a: b", "[x] y", "null", "a ${b} c"):
        assert generate_cli.parse_args(["run=somewhere", f"prompt={prompt}"]).prompt == prompt
    args = generate_cli.parse_args(["run=r", "top_k=null", "temperature=0", "max_new_tokens=3"])
    assert (args.top_k, args.temperature, args.max_new_tokens) == (None, 0.0, 3)
    with pytest.raises(Exception, match="topk"):
        generate_cli.parse_args(["run=r", "topk=3"])
