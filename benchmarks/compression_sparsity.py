"""The share of exact zeros in a checkpoint's kernels.

    python benchmarks/compression_sparsity.py DIR/checkpoints/STEP/params

Used by benchmarks/compression.sh to show that a pruned run's checkpoint holds the sparsity it was trained to.
"""

import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

tree = ocp.StandardCheckpointer().restore(sys.argv[1])
total = zeros = 0
for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if "kernel" in jax.tree_util.keystr(path):
        array = np.asarray(leaf)
        total += array.size
        zeros += int((array == 0).sum())
print(f"    kernels: {zeros}/{total} weights zero ({zeros / max(total, 1):.3f})")
