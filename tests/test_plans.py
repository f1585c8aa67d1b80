"""parallelize_module: matching, reports, kept weights, meta-device models, torch-plan compatibility, bad plans."""

import copy

import pytest
import torch
import torch.distributed.tensor.parallel as torch_tp
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import dtp
from dtp.plan.parallelize import _matches
from dtp.runtime.sharding import local_slice
from examples.gpt import GPT, GPTConfig, tp_plan

from .reference import assert_close


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


@pytest.mark.parametrize("pattern,path,expected", [
    ("layers.*.mlp.up", "layers.0.mlp.up", True),
    ("layers.*.mlp.up", "layers.10.mlp.up", True),
    ("layers.*", "layers.0.mlp", False),  # * never crosses a dot
    ("*.up", "mlp.up", True),
    ("layers.*.attention.w[qkv]", "layers.1.attention.wk", True),
    ("layers.*.attention.w[qkv]", "layers.1.attention.wo", False),
    ("", "", True),
    ("", "mlp", False),
])
def test_pattern_matching_one_segment_at_a_time(pattern, path, expected):
    assert _matches(pattern, path) is expected


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(4, 8), "down": nn.Linear(8, 4)}) for _ in range(2))
        self.conv = nn.Conv2d(1, 1, 1)


def _torch_style_with(**attributes):
    """A torch ColwiseParallel carrying options dtp cannot honour."""
    style = torch_tp.ColwiseParallel()
    vars(style).update(attributes)
    return style


def case_plan_errors():
    mesh = dtp.default_mesh()
    cases = [
        ({"blocks.*.upp": dtp.ColwiseParallel()}, ValueError, ["'blocks.*.upp'", "matches no module"]),
        ({"blocks.*.up": dtp.ColwiseParallel(), "blocks.0.*": dtp.RowwiseParallel()}, ValueError,
         ["'blocks.0.up'", "'blocks.*.up'", "'blocks.0.*'"]),
        ({"conv": dtp.ColwiseParallel()}, TypeError, ["'conv'", "ColwiseParallel", "Conv2d"]),
        ({"blocks.0.up": 42}, TypeError, ["'blocks.0.up'", "dtp style", "Hugging Face plan string"]),
        ({"blocks.0.up": "colwize"}, ValueError, ["'blocks.0.up'", "'colwize'", "'colwise'", "'rowwise_split_input'"]),
        ({"conv": "packed_colwise"}, TypeError, ["'conv'", "PackedColwiseParallel", "Conv2d"]),
        ({"blocks.0.up": dtp.PackedColwiseParallel(blocks=3)}, ValueError, ["'blocks.0.up'", "blocks=3", "8 packed"]),
        ({"blocks.0.up": _torch_style_with(input_layouts=(Replicate(), Replicate()))}, ValueError,
         ["'blocks.0.up'", "ColwiseParallel.input_layouts", "one placement"]),
        ({"blocks.0.up": _torch_style_with(input_kwarg_layouts={"x": Replicate()})}, ValueError,
         ["'blocks.0.up'", "'input_kwarg_layouts'", "cannot honour"]),
        ({"blocks.0.up": dtp.ColwiseParallel(output_layouts=Partial())}, ValueError, ["output_layouts", "Partial(sum)", "cannot be honoured"]),
        ({"blocks.0.up.weight": dtp.ColwiseParallel()}, ValueError, ["'blocks.0.up.weight'", "names parameters"]),
    ]
    messages = []
    for plan, exc, needles in cases:
        model = Net()
        before = {n: p.clone() for n, p in model.named_parameters()}
        with pytest.raises(exc) as info:
            dtp.parallelize_module(model, mesh, plan, strict=True)
        assert all(n in str(info.value) for n in needles), (needles, str(info.value))
        for n, p in model.named_parameters():  # nothing was changed
            assert not isinstance(p, DTensor) and torch.equal(p, before[n]), n
        messages.append(str(info.value))
    return messages


def case_unmatched_entry_warns_as_torch():
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="'blocks.*.upp' matches no module"):
        dtp.parallelize_module(model, None, {"blocks.*.upp": dtp.ColwiseParallel(), "blocks.*.up": dtp.ColwiseParallel()})
    assert model.blocks[0]["up"].weight.placements == (Shard(0),), "the rest of the plan is applied"
    x = torch.randn(3, 4)
    expected = local_slice(reference.blocks[0]["up"](x), Shard(-1), 2, dtp.default_mesh().get_local_rank())
    assert_close(model.blocks[0]["up"](x), expected, "the matched entry (colwise output, this rank's slice)")


def test_unmatched_entry_warns_and_is_skipped_as_in_torch(pools):
    pools.run(2, case_unmatched_entry_warns_as_torch)


def test_bad_plans_error_on_every_rank_and_change_nothing(pools):
    per_rank = pools.run(2, case_plan_errors)
    assert per_rank[0] == per_rank[1]


def case_report_and_kept_weights():
    rank = dtp.default_mesh().get_local_rank()
    torch.manual_seed(0)
    model = Net()
    original = copy.deepcopy(model)
    plan = {"blocks.*.up": dtp.ColwiseParallel(), "blocks.*.down": dtp.RowwiseParallel()}
    assert set(dtp.explain_plan(model, plan)) == {"blocks.0.up", "blocks.1.up", "blocks.0.down", "blocks.1.down"}
    assert dtp.parallelize_module(model, None, plan) is model
    report = dtp.applied_styles(model)
    assert report == {"blocks.0.up": dtp.ColwiseParallel(), "blocks.1.up": dtp.ColwiseParallel(),
                      "blocks.0.down": dtp.RowwiseParallel(), "blocks.1.down": dtp.RowwiseParallel()}
    assert isinstance(model.blocks[0]["up"], nn.Linear), "modules keep their class"
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), f"{name} should be a DTensor (the conv is replicated)"
        assert torch.equal(full(p), dict(original.named_parameters())[name]), f"{name} lost its values"
    assert model.blocks[0]["up"].weight.placements == (Shard(0),)
    assert model.blocks[0]["down"].weight.placements == (Shard(1),)
    assert model.blocks[0]["down"].bias.placements == (Replicate(),)
    x = torch.randn(3, 4)
    y = model.blocks[0]["down"](model.blocks[0]["up"](x))
    assert_close(y, original.blocks[0]["down"](original.blocks[0]["up"](x)), "Colwise -> Rowwise")
    return rank


def test_report_kept_weights_and_classes(pools):
    assert pools.run(2, case_report_and_kept_weights) == [0, 1]


def case_meta_device_model(sp):
    """Parallelize a model built on meta, then load the full weights: no rank materialises the whole model."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, dim=64, hidden=128, n_layers=2)
    reference = GPT(cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    dtp.parallelize_module(model, None, tp_plan(sp))
    assert all(p.to_local().device.type == "meta" for p in model.parameters())
    model.to_empty(device="cpu")
    dtp.load_full_state_dict(model, reference.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    assert_close(full(model(ids)), reference(ids), "meta-built model after loading")
    # memory: the bytes the parameters' storages really hold on this rank (a view into a full tensor would show)
    held = sum({p.to_local().untyped_storage().data_ptr(): p.to_local().untyped_storage().nbytes()
                for p in model.parameters()}.values())
    expected = 0
    tp = dtp.default_mesh().size()
    for p in model.parameters():
        shape = list(p.shape)
        for placement in p.placements:
            if isinstance(placement, Shard):
                shape[placement.dim] = -(-shape[placement.dim] // tp)  # rank 0 holds the largest chunk
        expected += torch.Size(shape).numel() * p.element_size()
    total = sum(p.numel() * p.element_size() for p in reference.parameters())
    replicated = sum(p.numel() * p.element_size() for p in model.parameters() if p.placements == (Replicate(),))
    return held, expected, total, replicated


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_meta_device_then_load_memory_is_full_over_tp(pools, world, sp):
    held, expected, total, replicated = pools.run(world, case_meta_device_model, sp)[0]  # rank 0: the largest chunks
    assert held == expected, (held, expected)
    assert held <= (total - replicated) / world + replicated, (held, total, replicated)
    assert held < 0.7 * total


def case_torch_plan_unchanged(sp):
    """The same plan text through torch's parallelize_module and through dtp's gives the same model."""
    torch.manual_seed(0)
    cfg = GPTConfig()
    single = GPT(cfg)
    mesh = dtp.default_mesh()
    with_torch = torch_tp.parallelize_module(copy.deepcopy(single), mesh, tp_plan(sp, styles=torch_tp))
    with_dtp = dtp.parallelize_module(copy.deepcopy(single), mesh, tp_plan(sp, styles=dtp))
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    losses = []
    for model in (with_torch, with_dtp):
        logits = model(ids)
        assert logits.placements == (Shard(2),)
        loss = dtp.vocab_parallel_cross_entropy(logits, ids)
        loss.backward()
        losses.append(loss)
        assert_close(full(logits), single(ids), "logits")
    assert_close(losses[1], losses[0], "dtp loss vs torch loss")
    grads = {n: p.grad for n, p in with_torch.named_parameters()}
    for name, p in with_dtp.named_parameters():
        assert_close(full(p.grad), full(grads[name]), f"grad of {name}: dtp vs torch", scale=3.0)


@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_torch_plan_runs_unchanged(pools, sp):
    pools.run(2, case_torch_plan_unchanged, sp)


def case_bad_inputs():
    """Heads that would be cut and ids outside the vocabulary: clear errors; an input in another layout than declared
    is redistributed, as torch does (the same result as in the declared layout)."""
    messages = []
    with pytest.raises(ValueError) as info:
        dtp.parallelize_module(GPT(GPTConfig(n_heads=3, dim=24)), None, tp_plan(False))
    assert "n_heads=3" in str(info.value) and "tp size 2" in str(info.value) and "layers.0.attention" in str(info.value)
    messages.append(str(info.value))
    model = dtp.parallelize_module(GPT(GPTConfig()), None, tp_plan(True))
    mesh = dtp.default_mesh()
    torch.manual_seed(1)
    other = DTensor.from_local(torch.randn(2, 8, 16), mesh, [Shard(2)], run_check=False)  # the same on every rank
    declared = other.redistribute(mesh, [Shard(1)])
    for module in (model.layers[0].attention_norm, model.layers[0].attention):
        assert_close(full(module(other)), full(module(declared)), "input in another layout, redistributed")
    with pytest.raises(IndexError, match="outside the vocabulary"):
        model(torch.tensor([[0, 1, 96]]))
    return messages


def test_bad_inputs_error_on_every_rank(pools):
    per_rank = pools.run(2, case_bad_inputs)
    assert per_rank[0] == per_rank[1]
