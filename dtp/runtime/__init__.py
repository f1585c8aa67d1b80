"""The runtime under the math: collectives on local shards, their differentiable pairs, DTensor <-> local conversions, gradient delivery, sharding, and the eager-or-traced choice."""
