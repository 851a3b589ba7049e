#!/bin/bash
# The pure-Python packages the GPU benchmarks need that the device image lacks (device README, "a Python package
# missing there can travel as wheels"): downloaded here into .whl/ (git-ignored), carried with `carry: [".whl"]`
# and installed there by benchmarks/gpu_session.sh. The versions are pyproject.toml's pins; importlib_metadata
# is diffusers' one requirement the image does not have.
#
#   bash benchmarks/gpu_wheels.sh          # then: run `bash benchmarks/gpu_session.sh a` with carry [".whl"]
set -eu
PKGS=${PKGS:-"diffusers==0.42.1 prodigyopt==1.1.2 schedulefree==1.4.1 importlib_metadata==10.2.0"}
grep -qx "/.whl/" .gitignore || { echo "error: run from the repository root (its .gitignore keeps /.whl/ out of git)" >&2; exit 2; }
mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $PKGS \
  || { echo "error: pip download of $PKGS failed (see above); the device cannot fetch packages itself" >&2; exit 1; }
ls -l .whl
