"""Checkpoints that interoperate with torch's own DCP, bit for bit with the optimizer: torch TP and torchtitan saves
(their key layouts, found from the checkpoint's keys) loaded by dtp at another tp; a dtp save read by plain dcp.load."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.tensor.parallel as torch_tp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh

import dtp
from examples.gpt import GPT, GPTConfig, tp_plan
from examples.llama import Llama, LlamaConfig, apply_tp, loss_and_backward

from .test_checkpoint import CFG, build, full_states

LLAMA = dict(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=4)  # whole kv heads at tp 4
SAVED_LR = 3e-3  # the savers' learning rate; the loaders build with another, so a load must bring it back


def _step(model, opt, vocab, seed):
    torch.manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 6))
    loss_and_backward(model(ids), ids)
    opt.step()
    opt.zero_grad()
    return model, opt


def torch_gpt(seed=0):
    """examples.gpt through torch's own parallelize_module and styles, after one AdamW step."""
    torch.manual_seed(seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = torch_tp.parallelize_module(GPT(GPTConfig(**CFG)), mesh, tp_plan(styles=torch_tp))
    return _step(model, torch.optim.AdamW(model.parameters(), lr=SAVED_LR), CFG["vocab_size"], 100 + seed)


def llama(seed=0, styles=torch_tp):
    """The torchtitan Llama through torchtitan's apply_tp (torch's styles, or dtp's), after one AdamW step."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**LLAMA))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if styles is dtp:
        apply_tp(model, mesh, loss_parallel=True, enable_sp=False, styles=dtp,
                 parallelize_module=dtp.parallelize_module)
    else:
        apply_tp(model, mesh, loss_parallel=True, enable_sp=False)
    lr = SAVED_LR if styles is torch_tp else 1e-2
    return _step(model, torch.optim.AdamW(model.parameters(), lr=lr), LLAMA["vocab_size"], 100 + seed)


def _reference(path, model, opt):
    states = full_states(model, opt)
    if dist.get_rank() == 0:
        torch.save(states, path + ".reference.pt")


def _same_as_saved(path, model, opt, with_optim=True):
    reference = torch.load(path + ".reference.pt")
    if not with_optim:
        reference = {k: v for k, v in reference.items() if k.startswith("model.")}
    loaded = {k: v for k, v in full_states(model, opt).items() if with_optim or k.startswith("model.")}
    assert set(loaded) == set(reference), set(loaded) ^ set(reference)
    for name, value in reference.items():
        assert torch.equal(loaded[name], value), f"{path}: {name} differs"
    if with_optim:
        assert all(g["lr"] == SAVED_LR for g in opt.param_groups), "the optimizer's hyperparameters were not loaded"
    return len(reference)


def case_save_plain(root):
    """tp 2: plain dcp.save of a torch-TP GPT ({"model", "optim"}) and of a torch-TP torchtitan Llama in torchtitan's
    layouts (model keys at the top or under "model", the flattened optimizer under "optimizer", other states beside);
    a dtp save for plain dcp.load."""
    model, opt = torch_gpt()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{root}/torch_tp")
    _reference(f"{root}/torch_tp", model, opt)
    model, opt = llama()
    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    others = {"lr_scheduler": {"last_epoch": 1}, "train_state": {"step": torch.tensor(1, dtype=torch.int32)}}
    dcp.save({**msd, "optimizer": osd, **others}, checkpoint_id=f"{root}/titan")
    dcp.save({"model": msd, "optimizer": osd, **others}, checkpoint_id=f"{root}/titan_2024")
    dcp.save(dict(msd), checkpoint_id=f"{root}/titan_weights")  # model_weights_only: a bare model state dict
    for name in ("titan", "titan_2024", "titan_weights"):
        _reference(f"{root}/{name}", model, opt)
    model, opt = build("tp", seed=7)
    opt.param_groups[0]["lr"] = SAVED_LR
    dtp.save_checkpoint(f"{root}/dtp", model, opt)
    _reference(f"{root}/dtp", model, opt)
    return {name: sorted(os.listdir(f"{root}/{name}")) for name in ("torch_tp", "titan", "dtp")}


def case_load_plain(root):
    """dtp loads each plain checkpoint at this world size (tp 4 or 1), bit for bit; plain dcp.load reads dtp's."""
    counts = {}
    model, opt = build("tp", seed=1)
    dtp.load_checkpoint(f"{root}/torch_tp", model, opt)
    counts["torch_tp"] = _same_as_saved(f"{root}/torch_tp", model, opt)
    for name in ("titan", "titan_2024"):
        model, opt = llama(seed=2, styles=dtp)
        dtp.load_checkpoint(f"{root}/{name}", model, opt)
        counts[name] = _same_as_saved(f"{root}/{name}", model, opt)
    model, opt = llama(seed=3, styles=dtp)
    with pytest.raises(dtp.CheckpointMismatch, match="no optimizer state"):
        dtp.load_checkpoint(f"{root}/titan_weights", model, opt)
    dtp.load_checkpoint(f"{root}/titan_weights", model)
    counts["titan_weights"] = _same_as_saved(f"{root}/titan_weights", model, opt, with_optim=False)
    model, opt = torch_gpt(seed=4)  # plain DCP, torch's TP: nothing of dtp
    opt.param_groups[0]["lr"] = 1e-2
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=f"{root}/dtp")
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    counts["dtp"] = _same_as_saved(f"{root}/dtp", model, opt)
    return counts


def test_plain_dcp_checkpoints_load_at_another_tp_and_back(pools, tmp_path):
    root = str(tmp_path)
    files = pools.run(2, case_save_plain, root)[0]
    assert ".metadata" in files["torch_tp"] and "dtp_complete.json" not in files["torch_tp"] + files["titan"]
    for world in (4, 1):
        counts = pools.run(world, case_load_plain, root)
        assert counts[0] == counts[-1]
        assert counts[0]["torch_tp"] > 2 * len(list(GPT(GPTConfig(**CFG)).parameters())), "optimizer state compared"
        assert counts[0]["titan"] > 2 * len(list(Llama(LlamaConfig(**LLAMA)).parameters()))


# -- key layouts, without ranks -------------------------------------------------------------------------------------

class _Meta:
    def __init__(self, size):
        self.size = size


def _saved(model_prefix, optim_prefix, flat=False, index_keyed=False):
    keys = {f"{model_prefix}{n}": _Meta((4,)) for n in ("a.weight", "b.weight")}
    if optim_prefix is not None:
        for i, n in enumerate(("a.weight", "b.weight")):
            for s in ("exp_avg", "exp_avg_sq", "step"):
                keys[f"{optim_prefix}state.{i if index_keyed else n}.{s}"] = _Meta((4,) if s != "step" else ())
            if flat:
                keys[f"{optim_prefix}param_groups.{n}.lr"] = object()
        if not flat:
            keys.update({f"{optim_prefix}param_groups.0.{k}": object() for k in ("lr", "params")})
    keys.update({"train_state.step": _Meta(()), "lr_scheduler.last_epoch": object()})
    return keys


@pytest.mark.parametrize("model_prefix,optim_prefix,flat", [
    ("model.", "optim.", False),  # dtp, torch TP with get_state_dict
    ("", "optimizer.", True),  # torchtitan
    ("model.", "optimizer.", True),  # torchtitan before 2025
    ("app.model.", "app.optim.", False),  # DCP's tutorial (a Stateful "app")
    ("model.", None, False),  # saved without an optimizer
], ids=["dtp", "torchtitan", "torchtitan-2024", "prefixed", "no-optimizer"])
def test_key_layouts_are_found_from_the_keys(model_prefix, optim_prefix, flat):
    from dtp.checkpoint.interop import check_keys

    model_sd = {"a.weight": torch.zeros(4), "b.weight": torch.zeros(4)}
    optim_sd = {"state": {n: {"exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4), "step": torch.tensor(1.0)}
                          for n in model_sd}, "param_groups": [{"lr": 1.0, "params": list(model_sd)}]}
    layout, extra, problems = check_keys(_saved(model_prefix, optim_prefix, flat), model_sd, optim_sd, True, True)
    assert (layout.model, extra) == (model_prefix, [])
    if optim_prefix is None:
        assert problems and "no optimizer state" in problems[0]
    else:
        assert (layout.optim, layout.optim_flat, problems) == (optim_prefix, flat, [])
    _, _, problems = check_keys(_saved(model_prefix, "optim.", index_keyed=True), model_sd, optim_sd, True, True)
    assert "optimizer.state_dict()'s numbers" in problems[0]  # optimizer state keyed by index: said so
    _, _, problems = check_keys({"other.weight": _Meta((4,))}, model_sd, optim_sd, False, True)
    assert "none of the model's keys" in problems[0] and "other.weight" in problems[0]
