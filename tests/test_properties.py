"""Hypothesis: any features, leading dims, world size and bias give nn.Linear's results on real ranks; a plan cut
into any pieces, applied in any order, gives the model one call gives."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_contract import case_contract
from .test_layers import LAYOUTS, case_layer
from .test_transformer import case_transformer_matches

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(world=st.integers(1, 4), layout=st.sampled_from(LAYOUTS), in_f=st.integers(1, 17),
       out_f=st.integers(1, 17), batch=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_dtp_layers_any_shape(pools, world, layout, in_f, out_f, batch, bias, seed):
    kind, mode = layout
    pools.run(world, case_layer, kind, in_f, out_f, bias, tuple(batch), "float32", mode, seed)


@SETTINGS
@given(world=st.sampled_from([1, 2, 4]), in_mult=st.integers(1, 4), out_mult=st.integers(1, 4),
       batch=st.lists(st.integers(1, 4), min_size=1, max_size=3), bias=st.booleans(),
       loss=st.sampled_from(["sum", "general"]))
def test_contract_any_divisible_shape(pools, world, in_mult, out_mult, batch, bias, loss):
    pools.run(world, case_contract, 4 * in_mult, 4 * out_mult, bias, tuple(batch), loss)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(world=st.sampled_from([1, 2, 3, 4]), heads_per_rank=st.integers(1, 2), head_dim=st.sampled_from([2, 4]),
       hidden_mult=st.integers(1, 3), vocab=st.integers(5, 40), seq=st.integers(1, 9), batch=st.integers(1, 3),
       sp=st.booleans(), norm=st.sampled_from(["layer", "rms"]), bias=st.booleans())
def test_transformer_any_dims(pools, world, heads_per_rank, head_dim, hidden_mult, vocab, seq, batch, sp, norm, bias):
    """Heads divisible by tp (the plan's requirement); vocab, sequence and hidden sizes anything, uneven included.

    In float64 (to 1e-10): a norm over 2 features is so ill-conditioned that float32 rounding alone moves the
    embedding's gradient by ~4e-5 (one process in float32 against itself in float64), past float32's tolerance.
    Outputs, loss and every gradient are compared; the parameters after AdamW are not (on a gradient far below
    Adam's eps its update is lr / eps = 1e6 times the gradient, float64 rounding included)."""
    heads = heads_per_rank * world
    cfg = dict(vocab_size=vocab, n_heads=heads, dim=heads * head_dim, hidden=hidden_mult * 5, n_layers=1,
               norm=norm, bias=bias)
    pools.run(world, case_transformer_matches, sp, cfg, batch, seq, 1, "float64", 0, False)


def case_plan_in_pieces(sp, pieces, seed):
    """The GPT plan cut into `pieces` calls (entries shuffled), one piece applied twice: the same model as one call."""
    import copy
    import random

    import torch
    from torch.distributed.tensor import DTensor

    import dtp
    from examples.gpt import GPT, GPTConfig, tp_plan

    from .reference import assert_close

    rng = random.Random(seed)
    plan = tp_plan(sp)
    keys = list(plan)
    rng.shuffle(keys)
    groups = [{k: plan[k] for k in keys[i::pieces]} for i in range(pieces)]
    torch.manual_seed(seed)
    single = GPT(GPTConfig(n_layers=2))
    mesh = dtp.default_mesh()
    model, once = copy.deepcopy(single), dtp.parallelize_module(copy.deepcopy(single), mesh, plan)
    for group in groups + [rng.choice(groups)]:
        dtp.parallelize_module(model, mesh, group)
    assert dtp.applied_styles(model) == dtp.applied_styles(once)
    ids = torch.randint(0, 96, (2, 8))
    results = []
    for m in (model, once):
        logits = m(ids)
        dtp.vocab_parallel_cross_entropy(logits, ids).backward()
        results.append((logits.full_tensor(), {n: p.grad.full_tensor() for n, p in m.named_parameters()}))
        assert all(isinstance(p, DTensor) and not isinstance(p._local_tensor, DTensor) for p in m.parameters())
    assert_close(results[0][0], results[1][0], "logits: pieces vs one call")
    for name, grad in results[1][1].items():
        assert_close(results[0][1][name], grad, f"grad of {name}: pieces vs one call")


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(world=st.sampled_from([2, 4]), sp=st.booleans(), pieces=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_plan_in_any_pieces_and_order(pools, world, sp, pieces, seed):
    pools.run(world, case_plan_in_pieces, sp, pieces, seed)


LAYOUTS_2D = [(1, 1), (1, 2), (2, 1), (1, 4), (2, 2), (4, 1)]  # (dp, tp); dp > 1 is TP x FSDP2


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(save_at=st.sampled_from(LAYOUTS_2D), load_at=st.sampled_from(LAYOUTS_2D))
def test_checkpoint_reshards_between_any_layouts(pools, tmp_path_factory, save_at, load_at):
    """Any saved (dp, tp) layout loads into any other bit for bit, the optimizer's state included."""
    from .test_checkpoint import case_load, case_save

    (dp, tp), (dp2, tp2) = save_at, load_at
    if save_at not in _SAVED:  # a save is deterministic (fixed seeds) and a load only reads: each layout saved once
        path = str(tmp_path_factory.mktemp("ckpt") / "ckpt")
        pools.run(dp * tp, case_save, "2d" if dp > 1 else "tp", path, dp)
        _SAVED[save_at] = path
    pools.run(dp2 * tp2, case_load, "2d" if dp2 > 1 else "tp", _SAVED[save_at], dp2)


_SAVED: dict = {}  # (dp, tp) -> the checkpoint saved at that layout in this session


BLOCK_PLANS = {  # how one MLP block (up: in -> hidden, down: hidden -> in, optional norm) may be split
    "megatron": lambda: {"up": "dtp.Colwise", "down": "dtp.Rowwise"},
    "torch objects": lambda: {"up": "torch.Colwise", "down": "torch.Rowwise"},
    "hf strings": lambda: {"up": "colwise", "down": "rowwise"},
    "gathered": lambda: {"up": "colwise_gather_output", "down": "rowwise_split_input"},
    "split input only": lambda: {"down": "rowwise_split_input"},
    "whole": lambda: {},
}


def _style(name):
    import torch.distributed.tensor.parallel as torch_tp

    import dtp

    table = {"dtp.Colwise": dtp.ColwiseParallel, "dtp.Rowwise": dtp.RowwiseParallel,
             "torch.Colwise": torch_tp.ColwiseParallel, "torch.Rowwise": torch_tp.RowwiseParallel}
    return table[name]() if name in table else name


def case_random_composition(widths, choices, norms, seed):
    """A random MLP of blocks, each split one way or another: outputs, input and parameter gradients = one process."""
    import copy

    import torch
    from torch import nn
    from torch.distributed.tensor import DTensor

    import dtp

    from .reference import assert_close

    torch.manual_seed(seed)
    blocks = []
    for (width, hidden), norm in zip(widths, norms):
        block = nn.ModuleDict({"up": nn.Linear(width, hidden), "down": nn.Linear(hidden, width)})
        if norm:
            block["norm"] = nn.LayerNorm(width)
        blocks.append(block)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(blocks)

        def forward(self, x):
            for b in self.blocks:
                x = x + b["down"](torch.relu(b["up"](b["norm"](x) if "norm" in b else x)))
            return x

    single = MLP()
    plan = {}
    for i, choice in enumerate(choices):
        plan.update({f"blocks.{i}.{name}": _style(style) for name, style in BLOCK_PLANS[choice]().items()})
        if norms[i] and choice != "whole":
            plan[f"blocks.{i}.norm"] = dtp.ReplicateParallel()
    model = dtp.parallelize_module(copy.deepcopy(single), None, plan)
    x = torch.randn(3, widths[0][0], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = model(x), single(x_ref)
    assert_close(y, y_ref, f"output of {choices}")
    g = torch.randn_like(y_ref)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert_close(x.grad, x_ref.grad, "input gradient")
    for (name, p), ref in zip(model.named_parameters(), single.parameters()):
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        assert_close(grad, ref.grad, f"grad of {name} ({choices})")


@settings(max_examples=45, deadline=None, suppress_health_check=list(HealthCheck))
@given(world=st.integers(1, 4), width=st.integers(1, 9), hidden=st.lists(st.integers(1, 13), min_size=1, max_size=3),
       choice=st.data(), seed=st.integers(0, 2**16))
def test_any_composition_of_styles_equals_one_process(pools, world, width, hidden, choice, seed):
    n = len(hidden)
    choices = choice.draw(st.lists(st.sampled_from(sorted(BLOCK_PLANS)), min_size=n, max_size=n))
    norms = choice.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    pools.run(world, case_random_composition, [(width, h) for h in hidden], choices, norms, seed)
