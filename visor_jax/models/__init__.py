"""Flax NNX modules. Importing this package configures Flax for them (see below)."""
import flax

# Parameters carry *logical* axis names as metadata; the mesh mapping is applied later by
# `sharding.py` from the config's rules table. Eager sharding would need a mesh at
# construction time (and break `jax.eval_shape` of full-size configs on a laptop).
flax.config.update("flax_always_shard_variable", False)
