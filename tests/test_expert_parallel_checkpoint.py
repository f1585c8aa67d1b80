"""DCP checkpoints of expert-parallel models: saved at ep 2, loaded at ep 4, at ep 1 and at tp 2 (experts whole,
attention split), model and AdamW state bit for bit; the next step then equals one process's."""

import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate

import dtp

from .moe_model import MoEModel, ep_plan, loss_fn
from .reference import assert_close
from .test_checkpoint import full_states
from .test_expert_parallel_compose import TP_PLAN


def build(layout, seed):
    """(model, AdamW) after one step: "ep" = experts over all ranks (a shared batch), "tp" = attention and the shared
    expert over tp, experts whole."""
    torch.manual_seed(seed)
    model = MoEModel(num_experts=8, top_k=2)
    mesh = dtp.init_mesh(tp=dist.get_world_size())
    dtp.parallelize_module(model, mesh, ep_plan(input_layouts=Replicate()) if layout == "ep" else TP_PLAN)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, opt, seed)
    return model, opt


def step(model, opt, seed):
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(100 + seed))
    loss = loss_fn(model, model(ids), ids)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def case_save(path):
    model, opt = build("ep", seed=0)
    dtp.save_checkpoint(path, model, opt)
    reference = full_states(model, opt)  # collectives: on every rank
    if dist.get_rank() == 0:
        torch.save(reference, path + ".reference.pt")
    return step(model, opt, seed=5)  # the step after the checkpoint


def case_load(layout, path):
    model, opt = build(layout, seed=1)  # other values: the load must overwrite every one
    dtp.load_checkpoint(path, model, opt)
    reference, loaded = torch.load(path + ".reference.pt"), full_states(model, opt)
    assert set(loaded) == set(reference), set(loaded) ^ set(reference)
    for name, value in reference.items():
        assert torch.equal(loaded[name], value), f"{name} differs after resharding"
    return len(reference), step(model, opt, seed=5)


def test_ep_checkpoint_reshards_bit_for_bit(pools, tmp_path):
    path = str(tmp_path / "ckpt")
    next_loss = pools.run(2, case_save, path)[0]
    for world, layout in ((4, "ep"), (1, "ep"), (2, "tp")):
        count, loss = pools.run(world, case_load, layout, path)[0]
        assert count > 2 * len(list(MoEModel(num_experts=8).parameters())), "optimizer state was compared too"
        assert_close(loss, next_loss, f"the step after loading at {layout} {world}")
