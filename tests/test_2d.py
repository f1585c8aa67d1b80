"""2-D TP x FSDP2 / TP x DDP, the reference verifier (and that it catches bugs), clipping and optimizer steps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

import dtp
from examples.gpt import GPT, GPTConfig, tp_plan

from .reference import assert_close, expect_errors

MLP_PLAN = {"0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()}


def tiny_mlp():
    """The reported failure: Linear(2,2) -> ReLU -> Linear(2,2), no biases."""
    return nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))


def mlp_with_bias():
    return nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6))


def softmax_mlp():
    """Splitting across a softmax over features is wrong: the verifier must say so."""
    return nn.Sequential(nn.Linear(4, 8), nn.Softmax(dim=-1), nn.Linear(8, 4))


def mse(out, target):
    return F.mse_loss(out, target)


def case_verify(model_name, plan_name, shape, tp=2):
    torch.manual_seed(123)
    inputs, targets = torch.randn(8, shape[0]), torch.randn(8, shape[1])
    report = dtp.verify(globals()[model_name], PLANS[plan_name], inputs, targets, mse, tp=tp)
    return report


PLANS = {"mlp": MLP_PLAN, "rowwise_first": {"0": dtp.RowwiseParallel(), "2": dtp.RowwiseParallel()}}


def test_reported_scenario_agrees_across_all_modes(pools):
    report = pools.run(4, case_verify, "tiny_mlp", "mlp", (2, 2))[0]
    report.assert_ok()
    assert set(report.errors) == {"<output>", "<loss>", "0.weight", "2.weight"}, "names without wrapper prefixes"
    assert all(set(v) == set(dtp.verify.__globals__["MODES"]) for v in report.errors.values())
    assert "PASS" in str(report)


def test_model_with_biases_agrees(pools):
    pools.run(4, case_verify, "mlp_with_bias", "mlp", (6, 6))[0].assert_ok()


def test_verifier_reports_a_silently_wrong_plan(pools):
    report = pools.run(4, case_verify, "softmax_mlp", "mlp", (4, 4))[0]
    assert not report.ok
    bad = {(mode, row) for mode, row, _ in report.failures()}
    assert ("tp", "<output>") in bad and ("tp", "0.weight") in bad and ("tp_fsdp", "0.bias") in bad
    assert not any(mode in ("ddp", "fsdp") for mode, _ in bad), "data parallel alone is right"
    with pytest.raises(AssertionError, match=r"tp: 0\.weight"):
        report.assert_ok()


def test_verifier_reports_a_plan_that_cannot_run(pools):
    report = pools.run(4, case_verify, "mlp_with_bias", "rowwise_first", (6, 6))[0]
    assert set(report.failures_by_mode) == {"tp", "tp_fsdp", "tp_ddp"}
    assert "input last dim is 6" in report.failures_by_mode["tp"]
    assert "tp raised" in str(report) and "FAIL" in str(report)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, factor):
        ctx.factor = factor
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _scaled_forward(self, x):
    weight = _ScaleGrad.apply(self.weight, self._dtp_mesh.size())
    return dtp.column_linear(x, weight, self.bias, gather_output=False)


class ScaledGradient(dtp.ColwiseParallel):
    """A buggy style: the weight gradient comes out multiplied by the tp size (the classic double reduction)."""

    def _apply(self, module, mesh):
        super()._apply(module, mesh)
        module.forward = _scaled_forward.__get__(module)


def case_scaled_gradient():
    torch.manual_seed(1)
    plan = {"0": ScaledGradient(), "2": dtp.RowwiseParallel()}
    return dtp.verify(mlp_with_bias, plan, torch.randn(8, 6), torch.randn(8, 6), mse)


def test_verifier_names_the_parameter_with_a_scaled_gradient(pools):
    report = pools.run(4, case_scaled_gradient)[0]
    bad = {(mode, row) for mode, row, _ in report.failures()}
    assert bad == {("tp", "0.weight"), ("tp_fsdp", "0.weight"), ("tp_ddp", "0.weight")}, bad


def gpt():
    return GPT(GPTConfig(vocab_size=30, dim=16, n_heads=4, hidden=24, n_layers=2))


def lm_loss(logits, targets):
    if isinstance(logits, DTensor):
        return dtp.vocab_parallel_cross_entropy(logits, targets)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def case_verify_transformer():
    torch.manual_seed(7)
    ids = torch.randint(0, 30, (4, 6))
    return dtp.verify(gpt, tp_plan(), ids, torch.roll(ids, -1, 1), lm_loss, fsdp_units=["layers.*"])


def test_transformer_agrees_across_all_modes(pools):
    report = pools.run(4, case_verify_transformer)[0]
    report.assert_ok()
    assert "layers.1.attention.wq.weight" in report.errors


def case_clip_and_step(data_parallel):
    """TP x FSDP2 / TP x DDP training steps with clip_grad_norm_ give the single-process parameters."""
    mesh = dtp.init_mesh(dp=2, tp=2)
    dp_rank = mesh["dp"].get_local_rank()
    torch.manual_seed(0)
    single = mlp_with_bias()
    model = dtp.parallelize_2d(copy.deepcopy(single), mesh, MLP_PLAN, data_parallel=data_parallel)
    opt_single = torch.optim.AdamW(single.parameters(), lr=1e-2, foreach=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    for step in range(3):
        x, y = torch.randn(8, 6) * 5, torch.randn(8, 6)
        mse(single(x), y).backward()
        mse(model(x.chunk(2)[dp_rank]), y.chunk(2)[dp_rank]).backward()
        norm_single = torch.nn.utils.clip_grad_norm_(single.parameters(), 0.5)
        norm = dtp.clip_grad_norm_(model.parameters(), 0.5)
        assert type(norm) is torch.Tensor
        assert_close(norm, norm_single.to(norm.dtype), f"step {step} total grad norm")
        assert float(norm_single) > 0.5, "the test should actually clip"
        opt_single.step()
        opt.step()
        opt_single.zero_grad()
        opt.zero_grad()
    params = dict(model.named_parameters())
    for name, p in single.named_parameters():
        full = params[name].full_tensor() if isinstance(params[name], DTensor) else params[name]
        assert_close(full, p, f"{name} after 3 clipped AdamW steps", scale=10.0)


@pytest.mark.parametrize("data_parallel", ["fsdp", "ddp"])
def test_clip_and_optimizer_step_match_single_process(pools, data_parallel):
    pools.run(4, case_clip_and_step, data_parallel)


def case_2d_bad_input():
    other_mesh = lambda: dtp.init_mesh(dp=2, tp=2)["dp"].__class__(  # noqa: E731
        "cpu", torch.arange(4).view(2, 2), mesh_dim_names=("dp", "cp"))
    return expect_errors([
        (ValueError, lambda: dtp.parallelize_2d(tiny_mlp(), dtp.init_mesh(tp=4), MLP_PLAN), ["2-D", "'dp'", "'tp'"]),
        (ValueError, lambda: dtp.parallelize_2d(tiny_mlp(), dtp.init_mesh(dp=2, tp=2), MLP_PLAN, data_parallel="zero"),
         ["'fsdp' or 'ddp'"]),
        (ValueError, lambda: dtp.parallelize_2d(tiny_mlp(), dtp.init_mesh(dp=2, tp=2), MLP_PLAN, fsdp_units=["blocks.*"]),
         ["'blocks.*'", "matches no module"]),
        (ValueError, lambda: dtp.parallelize_module(tiny_mlp(), other_mesh(), MLP_PLAN), ["axis named 'tp'"]),
        (ValueError, lambda: dtp.init_mesh(dp=3, tp=2), ["dp=3 x tp=2", "world size is 4"]),
    ])


def test_2d_bad_input_errors_on_every_rank(pools):
    per_rank = pools.run(4, case_2d_bad_input)
    assert all(m == per_rank[0] for m in per_rank)
