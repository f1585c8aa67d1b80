"""direct_apply: autograd.Function.apply through torch's C++ entry point, with Function.apply's behaviour."""

import pytest
import torch

from dtp.runtime.apply import direct_apply


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x * factor

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class _WithSetup(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2


def test_same_values_gradients_and_graph_as_apply():
    scale = direct_apply(_Scale)
    x = torch.randn(4, requires_grad=True)
    y = scale(x, 3.0)
    assert type(y.grad_fn) is type(_Scale.apply(x, 3.0).grad_fn)
    y.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 18 * x.detach())


def test_refuses_functions_with_setup_context():
    with pytest.raises(TypeError, match="_WithSetup defines setup_context"):
        direct_apply(_WithSetup)


def test_inside_a_functorch_transform_it_is_function_apply():
    scale = direct_apply(_Scale)
    with pytest.raises(RuntimeError, match="must override the setup_context"):  # Function.apply's own answer
        torch.func.grad(lambda t: scale(t, 2.0).sum())(torch.randn(3))
