"""The Hugging Face zoo's representative subset (zoo/hf_zoo.py runs every type by hand): each model type from a tiny
config through its own tp_plan equals one process (logits, loss, every gradient), or its plan's mistake is named."""

import pytest

pytest.importorskip("transformers")

import transformers  # noqa: E402

from zoo.hf_zoo import zoo_case  # noqa: E402


def _fused_gate_up_colwise(config_class) -> bool:
    """True where the installed transformers' plan for it still splits experts.gate_up_proj plain colwise (<= 5.24;
    5.25 leaves the experts to its ep_plan)."""
    plan = getattr(config_class, "base_model_tp_plan", None) or {}
    return plan.get("layers.*.mlp.experts.gate_up_proj") == "colwise"


INKLING2_AT_FAULT = _fused_gate_up_colwise(getattr(transformers, "Inkling2TextConfig", None))

PASS = [  # (model type, tp, why it is here)
    ("gemma", 2, "tied embeddings (transformers' own TP refuses them)"),
    ("olmoe", 2, "MoE (its experts: moe_tp_experts up to transformers 5.24, whole under tp in 5.25)"),
    ("deepseek_v3", 2, "MLA: mla_kv_a_proj, routed and shared experts"),
    ("qwen3_5_text", 2, "hybrid: linear attention's F.conv1d on its child's weight"),
    ("lfm3", 2, "hybrid: short convolutions in decoder layers no entry reaches"),
    ("longcat_flash", 2, "a router calling F.linear on its child's weight"),
    ("qwen3_5_text", 4, "hybrid at tp 4"),
    ("laguna", 2, "a per-head gate (g_proj: one output per head, split by heads)"),
] + ([] if INKLING2_AT_FAULT else [("inkling2_text", 2, "its plan as transformers 5.25 fixed it")]) + (
    [("minicpm5_moe", 2, "unit_colwise key/value projections (transformers 5.25)")]
    if hasattr(transformers, "MiniCPM5MoeConfig") else [])
AT_FAULT = [
    ("apertus", "module 'model.layers.0.mlp.act_fn' .*alpha_p.*column-parallel"),
    ("doge", "dt_proj.*one per head"),
] + ([("inkling2_text", r"experts\.gate_up_proj.*fused \[gate; up\].*'colwise'.*packed_colwise")]
       if INKLING2_AT_FAULT else [])  # the fused gate_up case itself: tests/test_hf_own_weights.py


@pytest.mark.parametrize("model_type,tp,why", PASS, ids=[f"{t}-tp{n}" for t, n, _ in PASS])
def test_zoo_model_equals_one_process(pools, model_type, tp, why):
    results = pools.run(tp, zoo_case, model_type, "dtp")
    assert results[0]["status"] == "passed", f"{model_type} ({why}): {results[0]}"
    assert all(r["status"] == "passed" for r in results), results


@pytest.mark.parametrize("model_type,reason", AT_FAULT, ids=[t for t, _ in AT_FAULT])
def test_zoo_model_whose_own_plan_is_wrong_is_named(pools, model_type, reason):
    """Apertus' trainable activation on column-parallel shards, Doge's rowwise per-head projection, Inkling2's plain
    colwise on a fused gate_up taken as halves: a PlanMistake naming the module on every rank (transformers gives a
    3.3x gradient error, a shape error and gradients off by 2.6x)."""
    import re

    results = pools.run(2, zoo_case, model_type, "dtp")
    for r in results:
        assert r["status"] == "plan at fault" and re.search(reason, r["reason"]), r
