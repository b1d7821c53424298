"""compile=true: Flow-Attention's passes as custom ops, no graph break inside an attention call, and each domain's
model compiled computing the eager model's function (forward and gradients, padding masks, causal and not, under
bf16 autocast), dropout included.

Compiling on a CPU takes seconds per graph, so the fast suite compiles tiny models of two domains (one non-causal,
one causal); the other domains' equivalence checks are `slow`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from experiments.bench.train_step import WORKLOADS, build, loss_function, make_batch
from flowformer.attention import flow_attention
from flowformer.attention.flow.ops import _option_args, blocked_flow, causal_flow
from flowformer.attention.flow.options import FlowOptions
from flowformer.compile import compile_model, configure_compiler, is_compiled, op_source_tag
from tests.helpers import gradients, random_qkv, relative_error

FAST_DOMAINS = ["uea", "d4rl"]
SLOW_DOMAINS = ["lra_text", "lra_retrieval", "imagenet", "wikitext103"]
SLOW = pytest.mark.slow  # reason in the skip message; each compiles a model (10-30 s on a 2-core CPU)


def masks(batch: int, length: int) -> dict:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[1, length - 4:] = True
    return {"key_padding_mask": mask, "query_padding_mask": mask}


@pytest.mark.parametrize("op", ["blocked", "causal"])
@pytest.mark.parametrize("options", [FlowOptions(), FlowOptions(competition=False, allocation=False)])
def test_flow_ops_pass_torch_library_opcheck(op, options):
    # schema, fake (meta) implementation, autograd registration, and tracing with dynamic shapes
    q, k, v = random_qkv(2, 3, 11, 4)
    if op == "causal":
        q, k = torch.sigmoid(q).detach().requires_grad_(), torch.sigmoid(k).detach().requires_grad_()
    real = torch.ones(2, 1, 11, 1, dtype=q.dtype)
    real[1, :, 8:] = 0
    flow_op = blocked_flow if op == "blocked" else causal_flow
    torch.library.opcheck(flow_op.forward, (q, k, v, real, real, *_option_args(options)))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["auto", "blocked"])
def test_compiled_flow_attention_matches_eager_with_padding(causal, backend):
    if causal and backend == "blocked":
        pytest.skip("the causal path has one form")
    q, k, v = random_qkv(2, 3, 13, 5)
    weights = torch.randn(2, 3, 13, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    configure_compiler()

    def attend(*tensors):
        return flow_attention(*tensors, causal=causal, backend=backend, **masks(2, 13))

    compiled = torch.compile(attend, fullgraph=True)  # fullgraph: a graph break would be an error
    out, grads = gradients(compiled, (q, k, v), weights)
    ref, ref_grads = gradients(attend, (q, k, v), weights)
    assert relative_error(out, ref) < 1e-12
    for got, expected in zip(grads, ref_grads):
        assert relative_error(got, expected) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_an_attention_call_is_one_graph(causal):
    q, k, v = random_qkv(2, 2, 9, 4, dtype=torch.float32)
    explained = torch._dynamo.explain(lambda *t: flow_attention(*t, causal=causal, **masks(2, 9)))(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def _model_and_batch(name: str, seed: int = 0):
    workload = WORKLOADS[name]
    model, _, _ = build(workload, "flow", "tiny", "cpu")
    return workload, model, make_batch(workload, "tiny", "cpu", seed=seed)


@pytest.mark.parametrize("name", FAST_DOMAINS + [pytest.param(n, marks=SLOW) for n in SLOW_DOMAINS])
def test_each_domain_model_compiles_without_graph_breaks(name):
    workload, model, batch = _model_and_batch(name)
    loss = loss_function(workload)
    explained = torch._dynamo.explain(lambda: loss(model, batch))()
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]


def _loss_and_grads(model, workload, batch, autocast: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks for eager and compiled (inductor's fallback_random)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_function(workload)(model, batch)
    loss.backward()
    return loss.detach().float(), {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", FAST_DOMAINS + [pytest.param(n, marks=SLOW) for n in SLOW_DOMAINS])
def test_compiled_domain_model_matches_eager(name, autocast):
    workload, eager, batch = _model_and_batch(name)
    eager.train()
    compiled = compile_model(copy.deepcopy(eager))
    assert is_compiled(compiled) and not is_compiled(eager)
    # the parameters keep their names: checkpoints of a compiled run load into an eager model
    assert list(compiled.state_dict()) == list(eager.state_dict())
    loss, grads = _loss_and_grads(eager, workload, batch, autocast)
    got_loss, got_grads = _loss_and_grads(compiled, workload, batch, autocast)
    # fp32: the same function up to float rounding; bf16: both round to bf16, in places that fusion may move
    tolerance = 2e-2 if autocast else 1e-4
    assert relative_error(got_loss, loss) < tolerance
    assert grads.keys() == got_grads.keys()
    for key in grads:
        assert relative_error(got_grads[key], grads[key]) < (10 * tolerance if autocast else tolerance), key


def test_the_cache_key_follows_the_flow_ops_source(monkeypatch):
    configure_compiler()
    assert op_source_tag() in torch.compiler.config.cache_key_tag
    configure_compiler()  # idempotent
    assert torch.compiler.config.cache_key_tag.count(op_source_tag()) == 1


def _tiny_run(tmp_path, name: str, *extra: str) -> dict:
    from experiments.train import train
    from tests.helpers import HARNESS, TINY_UEA, compose_config, write_tiny_uea

    write_tiny_uea(tmp_path / "data")
    cfg = compose_config(["experiment=uea/base", "data.dataset=Tiny", f"paths.data_dir={tmp_path / 'data'}", *TINY_UEA,
                          "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1", "compile=true", HARNESS, *extra])
    return train(cfg, tmp_path / name).to_dict()


def test_a_compiled_run_resumes_and_is_evaluated(tmp_path, monkeypatch):
    from experiments.evaluate import evaluate

    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))  # the records' portable paths refer to it

    full = _tiny_run(tmp_path, "full")
    with pytest.raises(RuntimeError, match="simulated kill"):
        _tiny_run(tmp_path, "resumed", "+callbacks.kill._target_=tests.helpers.InterruptAtEpoch", "+callbacks.kill.epoch=2")
    resumed = _tiny_run(tmp_path, "resumed", "resume=true")
    assert resumed["history"] == full["history"] and resumed["metrics"] == full["metrics"]
    # the checkpoints hold the eager parameter names
    state = torch.load(tmp_path / "full" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert state and not any("_orig_mod" in key for key in state)
    # experiments.evaluate compiles as the run did (its recorded config says compile=true), or not when told
    scored = evaluate(tmp_path / "full", ckpt="best")
    eager = evaluate(tmp_path / "full", ckpt="best", overrides=["compile=false"])
    assert scored["test/acc"] == pytest.approx(full["metrics"]["test/acc"])
    assert eager["test/loss"] == pytest.approx(scored["test/loss"], rel=1e-5)


def test_compile_is_not_part_of_the_recipe():
    from omegaconf import OmegaConf

    from results.recipe import science_config
    from tests.helpers import compose_config

    def science(*extra):
        return science_config(OmegaConf.to_container(compose_config(["experiment=uea/JapaneseVowels", *extra]),
                                                     resolve=True))

    assert science("compile=true") == science("compile=false") == science()
