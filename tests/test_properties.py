"""Hypothesis: any features, leading dims, world size and bias give nn.Linear's results on real ranks."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_contract import case_contract
from .test_layers import LAYOUTS, case_layer
from .test_transformer import case_transformer_matches

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


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


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(world=st.sampled_from([1, 2, 3, 4]), heads_per_rank=st.integers(1, 2), head_dim=st.sampled_from([2, 4]),
       hidden_mult=st.integers(1, 3), vocab=st.integers(5, 40), seq=st.integers(1, 9), batch=st.integers(1, 3),
       sp=st.booleans(), norm=st.sampled_from(["layer", "rms"]), bias=st.booleans())
def test_transformer_any_dims(pools, world, heads_per_rank, head_dim, hidden_mult, vocab, seq, batch, sp, norm, bias):
    """Heads divisible by tp (the plan's requirement); vocab, sequence and hidden sizes anything, uneven included."""
    heads = heads_per_rank * world
    cfg = dict(vocab_size=vocab, n_heads=heads, dim=heads * head_dim, hidden=hidden_mult * 5, n_layers=1,
               norm=norm, bias=bias)
    pools.run(world, case_transformer_matches, sp, cfg, batch, seq, 1, "float32")
