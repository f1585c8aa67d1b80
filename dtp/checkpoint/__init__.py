"""Checkpoints: full state dicts, sharded DCP checkpoints that reshard to any world size, packed layouts."""
