#!/usr/bin/env bash
# A/B runs of bench/worker_ab.py probes on the GPU machine, the working tree's shim against earlier
# commits' shims, alternating (the machine's noise is 5-10% between runs of one tree).
#   here:             bash bench/ab.sh prepare REV [REV...]    # .probe/<REV>/shim (.probe is git-ignored),
#                                                              # replacing the trees prepared before
#   on the machine:   bash bench/ab.sh run "cpu 8 32" [ROUNDS]  # carry [".probe", "models"]; after ci/gpu-run.sh
# `run` prints each run's tail, labelled "new" (the working tree) or the REV, and restores the tree.
set -u
case ${1:-} in
  prepare)
    shift
    for old in .probe/*/shim; do [ -d "$old" ] && rm -rf "$(dirname "$old")"; done
    for rev in "$@"; do
      rm -rf ".probe/$rev" && mkdir -p ".probe/$rev" && git archive "$rev" shim | tar -x -C ".probe/$rev" \
        && echo "prepared .probe/$rev/shim"
    done ;;
  run)
    probe=${2:?a worker_ab.py probe, e.g. "cpu 8 32"}
    rounds=${3:-2}
    # (/tmp/site-nvjpeg: the JPEG engines for --gpu-jpeg, where ci/gpu-run.sh installs them)
    export PYTHONPATH=/tmp/site:$PWD:$PWD/template/python3-accel:/tmp/site-nvjpeg PYTHONUNBUFFERED=1
    rm -rf /tmp/shim-new && cp -r shim /tmp/shim-new
    trap 'rm -rf shim && cp -r /tmp/shim-new shim' EXIT
    one() {
      rm -rf shim && cp -r "$2" shim
      echo "== $1 $probe $(date +%T)"
      timeout 150 "${PYTHON:-python3}" bench/worker_ab.py $probe 2>&1 | grep -v "No registered plugin" | tail -"${TAIL:-4}"
    }
    for _ in $(seq "$rounds"); do
      one new /tmp/shim-new
      for dir in .probe/*/shim; do [ -d "$dir" ] && one "$(basename "$(dirname "$dir")")" "$dir"; done
    done ;;
  *) sed -n 2,7p "$0"; exit 2 ;;
esac
