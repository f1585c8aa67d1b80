"""Checkpoints that survive a crash at any step of a save, and loads that refuse (or, non-strict, skip) what does not fit."""

import os

import pytest
import torch
import torch.distributed as dist

import dtp
import dtp.checkpoint.sharded as ckpt
from examples.gpt import GPT, GPTConfig, tp_plan

from .test_checkpoint import CFG, build, full_states
from tests.slowness import allowed

STEPS = ("mark complete", "retire previous", "promote new", "remove previous")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _crash_at(step, how="raise"):
    def at(name):
        if name == step:
            if how == "exit":
                os._exit(17)
            raise OSError(f"injected crash at {name!r}")
    return at


def case_crash_at_every_step(root):
    """Save A, then save B with a crash at one step: path loads as A or B, bit for bit; the next save C is clean."""
    for i, step in enumerate(STEPS):
        path = os.path.join(root, f"ckpt{i}")
        first, opt_a = build("tp", seed=1)
        dtp.save_checkpoint(path, first, opt_a)
        a = full_states(first, opt_a)
        second, opt_b = build("tp", seed=2)
        b = full_states(second, opt_b)
        ckpt._at = _crash_at(step)
        try:
            with pytest.raises(RuntimeError, match="injected crash"):
                dtp.save_checkpoint(path, second, opt_b)
        finally:
            ckpt._at = lambda name: None
        probe, opt_p = build("tp", seed=3)
        dtp.load_checkpoint(path, probe, opt_p)
        loaded = full_states(probe, opt_p)
        expected = a if step in ("mark complete", "retire previous") else b
        assert _same(loaded, expected), f"crash at {step!r}: loaded neither the expected checkpoint"
        third, opt_c = build("tp", seed=4)
        dtp.save_checkpoint(path, third, opt_c)  # puts the newest complete copy back, clears the debris, saves
        dtp.load_checkpoint(path, probe, opt_p)
        assert _same(full_states(probe, opt_p), full_states(third, opt_c)), f"after a crash at {step!r}"
        dist.barrier()
        assert not os.path.exists(path + ".partial") and not os.path.exists(path + ".old")


def test_a_crash_at_every_step_of_a_save_loses_nothing(pools, tmp_path):
    pools.run(2, case_crash_at_every_step, str(tmp_path))


def case_killed_between_renames(path, stage):
    """A rank killed with os._exit after the previous checkpoint was retired and before the new one was promoted."""
    model, opt = build("tp", seed=1 if stage == "before" else 2)
    if stage == "before":
        dtp.save_checkpoint(path, model, opt)
        return None
    if stage == "kill":
        if dist.get_rank() == 0:
            ckpt._at = _crash_at("promote new", how="exit")
        dtp.save_checkpoint(path, model, opt)  # rank 0 dies inside; the pool ends every rank
        return None
    probe, opt_p = build("tp", seed=3)
    assert not os.path.exists(path) and os.path.exists(path + ".partial"), "the kill landed between the renames"
    dtp.load_checkpoint(path, probe, opt_p)
    return _same(full_states(probe, opt_p), full_states(model, opt))


def test_a_rank_killed_between_the_renames_loses_nothing(pools, tmp_path):
    from dtp.testing import RankError, RankPool

    path = str(tmp_path / "ckpt")
    with RankPool(2, timeout=allowed(60)) as pool:  # its own ranks: this one dies
        pool.run(case_killed_between_renames, path, "before")
        with pytest.raises(RankError, match="died"):
            pool.run(case_killed_between_renames, path, "kill")
    assert pools.run(2, case_killed_between_renames, path, "load") == [True, True]  # the new one, complete


def case_strict_loads(root):
    path, bare, sgd = (os.path.join(root, name) for name in ("two_layers", "no_optimizer", "sgd"))
    model, opt = build("tp")
    dtp.save_checkpoint(path, model, opt)
    saved = full_states(model, opt)
    dtp.save_checkpoint(bare, model)
    sgd_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dtp.vocab_parallel_cross_entropy(model(torch.zeros(1, 4, dtype=torch.long)), torch.zeros(1, 4, dtype=torch.long)).backward()
    sgd_opt.step()
    dtp.save_checkpoint(sgd, model, sgd_opt)
    torch.manual_seed(5)
    smaller = dtp.parallelize_module(GPT(GPTConfig(**{**CFG, "n_layers": 1})), None, tp_plan())
    small_opt = torch.optim.AdamW(smaller.parameters(), lr=1e-2)
    messages = []
    cases = [
        (lambda: dtp.load_checkpoint(path, smaller), ["not in the model", "layers.1.", "strict=False"]),
        (lambda: dtp.load_checkpoint(bare, model, opt), ["no optimizer state", "saved without an optimizer"]),
        (lambda: dtp.load_checkpoint(sgd, model, opt), ["optimizer state differs", "exp_avg", "momentum_buffer"]),
    ]
    for call, needles in cases:
        before = full_states(model, opt)
        with pytest.raises(dtp.CheckpointMismatch) as info:  # an ordinary Exception (a ValueError)
            call()
        assert isinstance(info.value, ValueError) and all(n in str(info.value) for n in needles), str(info.value)
        assert _same(full_states(model, opt), before), "a refused load changed something"
        messages.append(str(info.value).split("does not fit")[1][:60])
    skipped = dtp.load_checkpoint(path, smaller, small_opt, strict=False)
    assert skipped and all(k.startswith("layers.1.") for k in skipped)
    for name, p in smaller.named_parameters():
        assert torch.equal(p.full_tensor(), saved[f"model.{name}"]), name
    return messages


def test_strict_loads_refuse_what_does_not_fit(pools, tmp_path):
    messages = pools.run(2, case_strict_loads, str(tmp_path))
    assert messages[0] == messages[1]
