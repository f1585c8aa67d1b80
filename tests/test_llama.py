"""A torchtitan-style Llama (GQA, RoPE, RMSNorm, SwiGLU) parallelized with torchtitan's two-call apply_tp, through
dtp.parallelize_module with dtp's styles and with torch's style objects, against the single-process model."""

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.distributed.tensor.parallel as torch_tp
from torch.distributed.tensor import DTensor

import dtp
from examples.llama import Llama, LlamaConfig, apply_tp, loss_and_backward

from .reference import assert_close


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def case_llama(sp, styles, precision):
    torch.manual_seed(0)
    cfg = LlamaConfig(n_heads=8, n_kv_heads=4)  # GQA with whole heads at tp 2 and 4
    single = Llama(cfg)
    model = copy.deepcopy(single)
    apply_tp(model, dtp.default_mesh(), loss_parallel=True, enable_sp=sp,
             styles=dtp if styles == "dtp" else torch_tp, parallelize_module=dtp.parallelize_module)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    # eps=1e-6: with the default 1e-8, Adam's first steps move an element whose gradient is rounding noise
    # (measured: 2e-9 against a median of 7e-4) by a full ±lr, in any two fp32 runs that sum in another order
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6) for m in (model, single)]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = (lambda: torch.autocast("cpu", torch.bfloat16)) if precision == "bf16" else nullcontext
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    targets = ids.roll(-1, 1)
    for step in range(3):
        results = []
        for m in (model, single):
            with autocast():
                logits = m(ids)
                results.append((full(logits), loss_and_backward(logits, targets)))
        (logits, loss), (ref_logits, ref_loss) = results
        assert logits.dtype == ref_logits.dtype == dtype
        assert_close(logits, ref_logits, f"step {step} logits", dtype)
        assert_close(full(loss), ref_loss, f"step {step} loss", dtype)
        for (name, p), ref in zip(model.named_parameters(), single.parameters()):
            assert p.dtype == p.grad.dtype == torch.float32, f"{name}: parameters and gradients stay float32"
            assert_close(full(p.grad), ref.grad, f"step {step} grad of {name}", dtype, scale=3.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, p), ref in zip(model.named_parameters(), single.parameters()):
        assert_close(full(p.detach()), ref.detach(), f"{name} after 3 AdamW steps", dtype, scale=3.0)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("styles", ["dtp", "torch"])
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_torchtitan_llama_two_call_plan(pools, world, precision, styles, sp):
    pools.run(world, case_llama, sp, styles, precision)
