"""Run by tests/test_data_multiprocess.py in each of several processes (not a test itself):

    python tests/multihost_batches.py OUT.json FIRST_STEP STEPS experiments/tiny.py [--config.a.b=v ...] \
        [--and [--config.a.b=v ...] ...]

Joins the job the JAX_* environment describes, reads this process's share of global batches FIRST_STEP ..
FIRST_STEP + STEPS - 1 (resuming from the iterator state {"step": FIRST_STEP}), assembles each global batch with
jax.make_array_from_process_local_data, gathers it back, and writes the hashes of its host batches and of the
global batches to OUT.json.0.PROCESS_INDEX. Each `--and` starts the overrides of one more config, read the same
way by the same job (one job for several sources: each process pays its start-up once), its hashes written to
OUT.json.N.PROCESS_INDEX for the N-th `--and`.
"""

import hashlib
import json
import sys

import numpy as np


def digest(batch: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        h.update(key.encode() + np.ascontiguousarray(batch[key]).tobytes())
    return h.hexdigest()


def main(out, first_step, steps, config_file, *overrides):
    from bigjax.parallel import distributed

    distributed.initialize_if_multiprocess()
    groups = [[]]
    for arg in overrides:
        if arg == "--and":
            groups.append([])
        else:
            groups[-1].append(arg)
    for index, group in enumerate(groups):
        read_batches(f"{out}.{index}", int(first_step), int(steps), config_file, group)


def read_batches(out, first_step, steps, config_file, overrides):
    import jax
    from jax.experimental import multihost_utils

    from bigjax import config as config_lib
    from bigjax import data
    from bigjax.parallel import mesh as mesh_lib

    config = config_lib.load(config_file, overrides)
    batches = data.train_batches(config)
    batches.set_state({"step": first_step})
    mesh = mesh_lib.make_mesh(config)
    hosts, globals_, rows = [], [], []
    for _ in range(steps):
        host = next(batches)
        global_batch = mesh_lib.global_batch_from_host(host, mesh)
        gathered = {k: np.asarray(v) for k, v in multihost_utils.process_allgather(global_batch, tiled=True).items()}
        hosts.append(digest(host))
        globals_.append(digest(gathered))
        rows.append(len(next(iter(host.values()))))
    result = dict(host=hosts, global_=globals_, rows=rows, processes=jax.process_count(), devices=jax.device_count())
    with open(f"{out}.{jax.process_index()}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
