"""Hypothesis: any features, leading dims, world size and bias give nn.Linear's results on real ranks."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_contract import case_contract
from .test_layers import LAYOUTS, case_layer

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
