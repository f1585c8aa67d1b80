"""Checkpoints: full state dicts (1-D and 2-D, no hang), DCP save at one layout and load at another, bit for bit."""

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.tensor import DTensor

import dtp
from examples.gpt import GPT, GPTConfig, tp_plan


CFG = dict(vocab_size=30, dim=16, n_heads=4, hidden=24, n_layers=2)


def build(layout, seed=0, dp=2):
    """(model, AdamW) at a layout ("tp": 1-D; "2d": dp x tp over the world, FSDP2 on dp), after one training step so
    the optimizer has state."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**CFG))
    world = dist.get_world_size()
    if layout == "2d":
        dtp.parallelize_2d(model, dtp.init_mesh(dp=dp, tp=world // dp), tp_plan(), fsdp_units=["layers.*"])
    else:
        dtp.parallelize_module(model, dtp.init_mesh(tp=world), tp_plan())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + seed)
    ids = torch.randint(0, CFG["vocab_size"], (2, 6))
    if layout == "2d":  # each dp rank its own part of the batch
        ids = torch.randint(0, CFG["vocab_size"], (2 * dp, 6)).chunk(dp)[dtp.init_mesh(dp=dp, tp=world // dp)["dp"].get_local_rank()]
    dtp.vocab_parallel_cross_entropy(model(ids), ids).backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def full_states(model, opt):
    """Every model and optimizer tensor as a full plain tensor, by name."""
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    out = {f"model.{k}": v for k, v in msd.items()}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{fqn}.{key}"] = value.full_tensor() if isinstance(value, DTensor) else value
    return {k: v.detach().cpu().clone() for k, v in out.items()}


def case_save(layout, path, dp=2):
    model, opt = build(layout, dp=dp)
    dtp.save_checkpoint(path, model, opt)
    reference = full_states(model, opt)
    if dist.get_rank() == 0:
        torch.save(reference, path + ".reference.pt")
    return sorted(os.listdir(path))


def case_load(layout, path, dp=2):
    model, opt = build(layout, seed=1, dp=dp)  # different values, so the load has to overwrite them all
    dtp.load_checkpoint(path, model, opt)
    reference = torch.load(path + ".reference.pt")
    loaded = full_states(model, opt)
    assert set(loaded) == set(reference), set(loaded) ^ set(reference)
    for name, value in reference.items():
        assert torch.equal(loaded[name], value), f"{name} differs after resharding"
    return len(reference)


@pytest.mark.parametrize("save_at,load_at", [((2, "tp"), (1, "tp")), ((2, "tp"), (4, "tp")),
                                             ((4, "2d"), (4, "tp")), ((4, "tp"), (4, "2d"))],
                         ids=["tp2-to-tp1", "tp2-to-tp4", "2x2-to-tp4", "tp4-to-2x2"])
def test_dcp_reshards_bit_for_bit(pools, tmp_path, save_at, load_at):
    path = str(tmp_path / "ckpt")
    files = pools.run(save_at[0], case_save, save_at[1], path)[0]
    assert "dtp_complete.json" in files and ".metadata" in files
    counts = pools.run(load_at[0], case_load, load_at[1], path)
    assert counts[0] > 2 * len(list(GPT(GPTConfig(**CFG)).parameters())), "optimizer state was compared too"


def case_full_state_dict(layout):
    """Plain names and plain full tensors equal to the single-process model; rank0_only keeps other ranks empty."""
    torch.manual_seed(0)
    single = GPT(GPTConfig(**CFG))
    torch.manual_seed(0)
    model, _ = build(layout) if layout == "2d" else (dtp.parallelize_module(GPT(GPTConfig(**CFG)), None, tp_plan()), None)
    sd = dtp.full_state_dict(model, cpu_offload=True)
    if layout != "2d":
        assert set(sd) == set(single.state_dict())
        for name, value in single.state_dict().items():
            assert type(sd[name]) is torch.Tensor and torch.equal(sd[name], value), name
    else:
        assert set(sd) == set(single.state_dict()) and all(type(v) is torch.Tensor for v in sd.values())
    only0 = dtp.full_state_dict(model, rank0_only=True)
    assert (len(only0) > 0) == (dist.get_rank() == 0)
    # load it back into a fresh model of the same layout: each rank takes its slice
    fresh, _ = build(layout, seed=5) if layout == "2d" else (dtp.parallelize_module(GPT(GPTConfig(**CFG)), None, tp_plan()), None)
    dtp.load_full_state_dict(fresh, sd)
    again = dtp.full_state_dict(fresh)
    assert all(torch.equal(again[k], sd[k]) for k in sd)


@pytest.mark.parametrize("world,layout", [(2, "tp"), (4, "2d")])
def test_full_state_dict(pools, world, layout):
    pools.run(world, case_full_state_dict, layout)


def case_interrupted_save(path):
    """A save that dies before it finishes leaves the previous checkpoint as it was, and never a complete-looking one."""
    model, opt = build("tp")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        dtp.load_checkpoint(path, model, opt)
    import dtp.checkpoint.sharded as ckpt

    original = ckpt._finalize
    ckpt._finalize = lambda partial, final: (_ for _ in ()).throw(RuntimeError("killed"))
    try:
        with pytest.raises(RuntimeError, match="finishing .* failed on rank 0"):
            dtp.save_checkpoint(path, model, opt)  # every rank hears of it; none is left waiting
    finally:
        ckpt._finalize = original
    with pytest.raises(FileNotFoundError):
        dtp.load_checkpoint(path, model, opt)  # the half-written .partial is never taken for a checkpoint
    dist.barrier()  # every rank has looked before one of them makes the directory below
    os.makedirs(path, exist_ok=True)
    with pytest.raises(ValueError, match="incomplete"):
        dtp.load_checkpoint(path, model, opt)  # a directory without the completion marker
    dist.barrier()
    if dist.get_rank() == 0:
        os.rmdir(path)
    dist.barrier()
    dtp.save_checkpoint(path, model, opt)  # a good save replaces the debris
    dtp.load_checkpoint(path, model, opt)


def test_interrupted_save_never_loads(pools, tmp_path):
    pools.run(2, case_interrupted_save, str(tmp_path / "ckpt"))


def case_shape_mismatch(path):
    model, opt = build("tp")
    dtp.save_checkpoint(path, model, opt)
    torch.manual_seed(3)
    bigger = dtp.parallelize_module(GPT(GPTConfig(**{**CFG, "dim": 32})), None, tp_plan())
    before = dtp.full_state_dict(bigger)
    with pytest.raises(ValueError) as info:
        dtp.load_checkpoint(path, bigger)
    assert "does not fit" in str(info.value) and "tok_embeddings.weight" in str(info.value)
    after = dtp.full_state_dict(bigger)
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed load changed the model"
    with pytest.raises(ValueError, match="shapes that do not fit"):
        dtp.load_full_state_dict(bigger, dtp.full_state_dict(model))
    return str(info.value)


def test_checkpoint_shape_mismatch_loads_nothing(pools, tmp_path):
    messages = pools.run(2, case_shape_mismatch, str(tmp_path / "ckpt"))
    assert messages[0] == messages[1]
