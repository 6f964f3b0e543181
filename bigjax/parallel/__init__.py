"""Parallelism that sharding rules alone cannot express: collectives written by hand inside `jax.shard_map` regions.

`context`: attention over a sequence split across the mesh axis `context` (all-gather and ring), zig-zag order.
"""
