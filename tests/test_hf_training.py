"""Hugging Face models through their own `tp_plan`, trained as the Trainer trains them: `train()` mode with
`gradient_checkpointing_enable()` (torch.utils.checkpoint, reentrant or not), against one process."""

import copy

import pytest
import torch

import dtp

from .reference import full


def case_gradient_checkpointing(model_type: str, reentrant: bool):
    """The model's loss and every parameter gradient under gradient checkpointing equal one process's."""
    import transformers

    from zoo.hf_zoo import causal_lm_types
    from zoo.tiny_configs import tiny_config

    config_class, class_name = next((c, n) for t, c, n in causal_lm_types() if t == model_type)
    torch.manual_seed(0)
    single = getattr(transformers, class_name)(tiny_config(config_class)).train()
    model = copy.deepcopy(single)
    dtp.parallelize_module(model, dtp.default_mesh(), model.tp_plan)
    for m in (model, single):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    ids = torch.randint(0, single.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    loss, ref = model(input_ids=ids, labels=ids).loss, single(input_ids=ids, labels=ids).loss
    loss.backward()
    ref.backward()
    torch.testing.assert_close(full(loss), ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(full(p.grad), q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return True


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_gradient_checkpointing_through_the_models_own_plan(pools, model_type, reentrant):
    pytest.importorskip("transformers")
    assert pools.run(2, case_gradient_checkpointing, model_type, reentrant) == [True, True]
