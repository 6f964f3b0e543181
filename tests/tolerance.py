"""How far apart float32 results computed in another order may be: the tolerances of the equivalence tests.

Sharded and unsharded runs, or one batch and several, compute the same values with their sums added in another
order (per device and then across devices, per batch and then batch by batch). Rounding makes the results differ in
their last bits; the bounds here say by how much at most, so that a test fails only when the code is wrong.
"""

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23: the gap between 1 and the next float32


def float32_sum_tolerance(terms: int) -> float:
    """Relative to the sum of the terms' magnitudes, how far apart two float32 sums of the same `terms` numbers
    added in different orders can be: each is within (terms - 1) * EPS32 / 2 of the exact sum (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed., eq. 4.4: gamma_(n-1) for any order of n terms), so the two are
    within (terms - 1) * EPS32 of each other."""
    return max(terms - 1, 1) * EPS32
