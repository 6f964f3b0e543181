#!/usr/bin/env bash
# Run HERE, where PyPI is reachable: download into .whl/ (ignored by git) the wheels bigjax needs that the GPU
# machine's image lacks (it has jax with the CUDA 13 plugin, flax, optax, orbax, numpy, absl, etils, protobuf,
# torch). benchmarks/gpu.sh installs them there from the carried .whl/ folder. Python 3.12, x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
  manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# The versions this checkout is tested with (pyproject.toml's ranges); their own needs are on the image already,
# except those listed here (grain -> array-record, portpicker; ml-collections -> PyYAML is there).
for wheel in grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 tensorboardX==2.6.5; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$wheel"
done
du -sh .whl && ls .whl
