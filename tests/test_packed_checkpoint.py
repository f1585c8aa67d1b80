"""Packed projections in state dicts and checkpoints: the original packed layout in and out, DCP checkpoints resharded
across tp sizes (tp 2 -> 4 and -> a model never parallelized) bit for bit with the optimizer; a sequence-sharded
input, a meta-device build, TP x FSDP2."""

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

import dtp
from examples.nanogpt import GPT, GPTConfig, gpt_plan

from .reference import assert_close
from .test_packed import build, loss_of


def case_state_dict_and_save(path):
    """Full state dicts give and take the original layout; a DCP checkpoint saved at this tp (after one step)."""
    single, model = build("gpt")
    reference = single.state_dict()
    state = dtp.full_state_dict(model)
    assert set(state) == set(reference)
    for name, ref in reference.items():
        assert torch.equal(state[name], ref), name
    other, _ = build("gpt", seed=5)
    dtp.load_full_state_dict(model, other.state_dict())
    for name, value in dtp.full_state_dict(model).items():
        assert torch.equal(value, other.state_dict()[name]), name
    dtp.load_full_state_dict(model, reference)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    torch.manual_seed(1)
    ids = torch.randint(0, single.cfg.vocab_size, (2, 9))
    loss_of(model, ids)[1].backward()
    opt.step()
    dtp.save_checkpoint(path, model, opt)
    saved = optimizer_states(model, opt)
    if dist.get_rank() == 0:
        torch.save({"model": dtp.full_state_dict(model), "optim": saved}, path + ".reference.pt")
    else:
        dtp.full_state_dict(model)


def optimizer_states(model, opt):
    """{(parameter name, exp_avg / exp_avg_sq): full tensor in the original layout}."""
    layouts, out = dtp.packed_layouts(model), {}
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            value = opt.state[p][key]
            value = value.full_tensor() if isinstance(value, DTensor) else value
            out[name, key] = layouts[name].unpack(value) if name in layouts else value
    return out


def one_step_reference():
    """The single-process GPT and its AdamW after the step case_state_dict_and_save takes."""
    single, _ = build("gpt")
    opt = torch.optim.AdamW(single.parameters(), lr=1e-3, eps=1e-6)
    torch.manual_seed(1)
    ids = torch.randint(0, single.cfg.vocab_size, (2, 9))
    loss_of(single, ids)[1].backward()
    opt.step()
    return single, opt, ids


def case_load_resharded(path, parallel):
    """Load the checkpoint at this world size (packed at tp=world, or a plain model never parallelized): bit for bit
    the parameters and AdamW state saved, and the next step as one process takes it."""
    single, ref_opt, ids = one_step_reference()
    torch.manual_seed(7)
    model = GPT(GPTConfig())
    if parallel:
        dtp.parallelize_module(model, dtp.default_mesh(), gpt_plan())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    loss_of(model, torch.randint(0, single.cfg.vocab_size, (2, 5)))[1].backward()
    opt.step()  # optimizer state to overwrite
    opt.zero_grad()
    dtp.load_checkpoint(path, model, opt)
    saved = torch.load(path + ".reference.pt")
    state = dtp.full_state_dict(model)
    assert set(state) == set(saved["model"])
    for name, value in saved["model"].items():  # bit for bit what was saved, in the original layout
        assert torch.equal(state[name], value), name
    for key, value in optimizer_states(model, opt).items():
        assert torch.equal(value, saved["optim"][key]), key
    for m, o in ((model, opt), (single, ref_opt)):
        o.zero_grad()
        loss_of(m, ids)[1].backward()
        o.step()
    for name, ref in single.state_dict().items():
        assert_close(dtp.full_state_dict(model)[name], ref, f"{name} after the resumed step")


def test_state_dict_and_checkpoint_reshard_tp2_to_tp4_and_tp1(pools, tmp_path):
    path = str(tmp_path / "ckpt")
    pools.run(2, case_state_dict_and_save, path)
    pools.run(4, case_load_resharded, path, True)
    pools.run(1, case_load_resharded, path, False)


def case_sequence_parallel_meta_and_2d(path):
    """A sequence-sharded input; a model built on meta, then loaded; TP x FSDP2 (dp 2 x tp 2): its full state dict and
    a checkpoint it saves, loaded at tp 4, in the original layout."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(8, 12))
    model = copy.deepcopy(single)
    dtp.parallelize_module(model, dtp.default_mesh(), {"0": dtp.PackedColwiseParallel(
        blocks=3, input_layouts=Shard(1), output_layouts=Replicate())})
    x = torch.randn(2, 2 * world, 8)
    assert_close(model(x.chunk(world, 1)[rank]), single(x), "sequence-parallel input, gathered output")

    torch.manual_seed(0)
    single = GPT(GPTConfig())
    with torch.device("meta"):
        model = GPT(GPTConfig())
    dtp.parallelize_module(model, dtp.default_mesh(), gpt_plan(), src_data_rank=None)
    model.to_empty(device="cpu")
    dtp.load_full_state_dict(model, single.state_dict())
    ids = torch.randint(0, single.cfg.vocab_size, (2, 9))
    assert_close(model(ids), single(ids), "meta-built model, loaded")

    model = copy.deepcopy(single)
    dtp.parallelize_2d(model, dtp.init_mesh(dp=2, tp=2), gpt_plan(), fsdp_units=["transformer.h.*"])
    for name, value in dtp.full_state_dict(model).items():
        assert torch.equal(value, single.state_dict()[name]), name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    loss_of(model, ids)[1].backward()
    opt.step()
    dtp.save_checkpoint(path, model, opt)
    saved = dtp.full_state_dict(model)
    torch.manual_seed(9)
    tp4 = GPT(GPTConfig())
    dtp.parallelize_module(tp4, dtp.init_mesh(tp=4), gpt_plan())
    dtp.load_checkpoint(path, tp4)
    for name, value in dtp.full_state_dict(tp4).items():
        assert torch.equal(value, saved[name]), name


def test_sequence_parallel_meta_init_and_tp_x_fsdp(pools, tmp_path):
    pools.run(4, case_sequence_parallel_meta_and_2d, str(tmp_path / "ckpt"))
