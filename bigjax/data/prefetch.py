"""Global batches placed on the devices ahead of the step that uses them.

The train loop dispatches step N asynchronously and, while it runs, asks for the next batch; `DeviceBatches`
hands out a batch whose host-to-device copy was started `prefetch` steps earlier, and starts the copy of the
one `prefetch` steps ahead. The batches are exactly those of the host iterator, in its order: prefetching
changes when a batch is copied, never which batch a step sees.
"""

from __future__ import annotations

import collections

from bigjax.parallel import mesh as mesh_lib


class DeviceBatches:
    """Global device batches from a checkpointable host iterator, `prefetch` of them copied ahead of use.

    The host iterator runs ahead of the loop; the checkpointed position must not. `get_state` is the host
    iterator's state right after it produced the last batch handed out (consumed), so a resumed run starts at
    the first batch this one did not train on. `set_state` drops the batches in flight.
    """

    def __init__(self, host_batches, mesh, prefetch: int):
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.host_batches = host_batches
        self.mesh = mesh
        self.prefetch = prefetch
        self.in_flight = collections.deque()  # (device batch, host iterator state right after producing it)
        self.consumed_state = host_batches.get_state()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        # The batch handed out now, and `prefetch` more whose copies run while its step does.
        while len(self.in_flight) < self.prefetch + 1:
            host_batch = next(self.host_batches)
            device_batch = mesh_lib.global_batch_from_host(host_batch, self.mesh)  # starts an asynchronous copy
            self.in_flight.append((device_batch, self.host_batches.get_state()))
        batch, self.consumed_state = self.in_flight.popleft()
        return batch

    def get_state(self) -> dict:
        return self.consumed_state

    def set_state(self, state: dict) -> None:
        self.host_batches.set_state(state)
        self.in_flight.clear()
        self.consumed_state = self.host_batches.get_state()
