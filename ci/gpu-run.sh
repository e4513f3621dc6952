#!/usr/bin/env bash
# On the GPU machine (device tool), from the project root, after the onnxruntime-gpu chunks were
# copied to /tmp/ortw (see ../shared/gpu/README.md): install it and the .whl wheels into /tmp/site,
# then run the GPU tests and the benchmarks, with everything they print and write under $OUT.
#   bash ci/gpu-run.sh [tests|bench|single|kaas|probes|threads|gpujpeg|jpegstages|nvjpeg|all]...   (default: all; SHIM_WORKERS=N, default 8)
#   (probes, not in all: the device pipeline alone, and CPU per image at 32 clients with 4, 8 and 16 workers;
#    threads, not in all: `cpu N 32` with connection threads (the default) and with --no-connection-threads,
#    alternating three times, then the throughput section without them;
#    gpujpeg, not in all: the same with --gpu-jpeg (.whl-gpu carried or installed before), then with it;
#    jpegstages, not in all: `stages N 32` without and with --gpu-jpeg: the device cycle's stages;
#    gpujpeg128, not in all: `cpu N 128` without and with --gpu-jpeg, alternating twice;
#    launchers, not in all: `cpu N 32 --gpu-jpeg` with the classifier's instance_count 1 and 2 (two bound
#    batcher threads), alternating three times, then one pair without --gpu-jpeg;
#    replicas, not in all: `cpu N 32` with one shim against two whole shims (N/2 and N workers each) on the one
#    GPU, the clients spread over them, without and with --gpu-jpeg, alternating twice;
#    spy, not in all: py-spy (.probe/pyspy/*.whl carried) on the device process at 32 clients with --gpu-jpeg;
#    jpegcall, not in all: bench/jpeg_call_probe.py, the shim's nvJPEG call against nvImageCodec's, per batch,
#    and nvJPEG's own GPU memory;
#    jpegmemory, not in all: bench/jpeg_memory_probe.py, nvJPEG's memory and time for batches of large JPEGs
#    under several pixel budgets per call)
#   (nvjpeg, not in all: bench/nvjpeg_probe.py, JPEG decoding on the GPU against the shim's CPU decode
#    -> nvjpeg.log, nvjpeg-probe.json. .whl-gpu/*.whl (nvImageCodec + nvJPEG), when carried, is installed
#    into /tmp/site-nvjpeg first thing, for it, the gpujpeg step and tests/test_cuda_jpeg.py. The shim's
#    --gpu-jpeg needs nvJPEG alone (it finds nvidia/cu13/lib/libnvjpeg.so.13 on the path); the probe and
#    trees before 2026-12-03's twenty-second session use nvImageCodec, whose libraries have RUNPATH
#    $ORIGIN/../../cu13/lib (both wheels go to /tmp/site-nvjpeg/nvidia/ in one pip call))
# Prepared here, before the device calls (all git-ignored):
#   bash ../shared/gpu/prepare-ort-gpu.sh            -> .ort1 .. .ort5 (onnxruntime-gpu in chunks)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     flask==3.1.2 waitress==3.0.2 blinker==1.9.0 itsdangerous==2.2.0 pillow==13.0.0 simplejpeg==1.9.0
# and, for --gpu-jpeg (.whl-gpu, ~29 MB, git-ignored; and the nvjpeg probe's two sample JPEGs in .probe/nvjpeg):
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl-gpu nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.2.3.58
#   python bench/nvjpeg_probe.py make-inputs .probe/nvjpeg     (needs scikit-image: .venv here, not there)
# then device calls 1..4 copy .ortK/part to /tmp/ortw/pK (call 1 also name and sha256), call 5
# carries .ort5 and .whl, copies .whl to /tmp/whl and runs `bash ci/gpu-run.sh none` (installs);
# later calls carry models/ (a call carries at most 64 MiB with the tree), first
# `mkdir -p .whl && cp /tmp/whl/*.whl .whl/ && cp -r models /tmp/models`, then this script.
# .whl-gpu goes in a call with models (18 MB), never with .ort5 + .whl (a call carries at most 64 MiB):
# carry models, .whl-gpu and .probe/nvjpeg in the first call after the install (tests), then models.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
root=$(pwd)
if [ ! -d /tmp/site/onnxruntime ]; then
  (cd /tmp/ortw && cat p? > "$(cat name)" && echo "$(cat sha256)  $(cat name)" | sha256sum -c --quiet \
    && python3 -m pip install -q --no-index --no-deps --target /tmp/site "$(cat name)") || echo "onnxruntime-gpu: not installed"
fi
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# nvJPEG (--gpu-jpeg) and nvImageCodec (the nvjpeg probe, older trees) in a target of their own, last on the path: pip
# --target --upgrade replaces a top-level directory that is there (nvidia/), and their nvidia/ extends
# the namespace rather than hiding it
[ -d .whl-gpu ] && [ ! -d /tmp/site-nvjpeg/nvidia ] && python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --target /tmp/site-nvjpeg .whl-gpu/*.whl
export PYTHONPATH=/tmp/site:$root:$root/template/python3-accel:/tmp/site-nvjpeg PYTHONUNBUFFERED=1
[ -d models/efficientnet-lite0 ] || cp -r /tmp/models models 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import onnxruntime as o, cupy as c; print('ort', o.__version__, o.get_available_providers()); print('cupy', c.__version__)" | tee -a "$OUT/gpu.txt"
# `cpu N 32` alternating without and with FLAG three times, then the throughput section with SETTING
# (the same, from the environment) -> $OUT/NAME.log and bench-NAME.tgz
alternate() {
  local flag=$1 setting=$2 name=$3
  { for _ in 1 2 3; do
      timeout 90 python3 bench/worker_ab.py cpu "$workers" 32
      timeout 90 python3 bench/worker_ab.py cpu "$workers" 32 "$flag"
    done
    env "$setting" timeout 200 python3 -m bench gpu --device cuda --sections throughput \
      --shim-workers "$workers" --no-plots --out "$OUT/bench-$name"
  } 2>&1 | grep -v "No registered plugin" | tee "$OUT/$name.log" | tail -40
}
instances() {  # the classifier's instance_count in models/ (1: the key left out, the default)
  python3 - "$1" <<'PY'
import json, sys
path = "models/efficientnet-lite0/model.json"
meta = json.load(open(path))
meta.pop("instance_count", None)
if int(sys.argv[1]) > 1:
    meta["instance_count"] = int(sys.argv[1])
json.dump(meta, open(path, "w"), indent=2)
PY
}
what=${*:-all}
workers=${SHIM_WORKERS:-8}
for step in $what; do
  case $step in
    tests|all)
      timeout 360 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
        tests/test_cuda*.py tests/test_workers.py tests/test_faults.py \
        $(ls tests/test_kaas*gpu*.py 2>/dev/null) 2>&1 | tee "$OUT/tests-gpu.log" | tail -40 ;;&
    bench|all)
      timeout 480 python3 -m bench gpu --device cuda --shim-workers "$workers" --out "$OUT/bench" 2>&1 \
        | tee "$OUT/bench-gpu.log" | tail -60 ;;&
    single|all)  # the throughput section again, the shim as one process (no request workers)
      timeout 200 python3 -m bench gpu --device cuda --sections throughput --no-plots --out "$OUT/bench-single" 2>&1 \
        | tee "$OUT/bench-single.log" | tail -20 ;;&
    kaas|all)
      [ -f bench/kaas.py ] && timeout 60 python3 -m bench kaas --device cuda --out "$OUT/bench" 2>&1 \
        | tee "$OUT/bench-kaas.log" | tail -30 ;;&
    probes)
      { timeout 90 python3 bench/worker_ab.py pipeline
        for n in 4 8 16; do timeout 90 python3 bench/worker_ab.py cpu "$n" 32; done
      } 2>&1 | grep -v "No registered plugin" | tee "$OUT/probes.log" | tail -20 ;;
    threads)
      alternate --no-connection-threads ACCELSHIM_CONNECTION_THREADS=0 threads ;;
    gpujpeg)
      alternate --gpu-jpeg ACCELSHIM_GPU_JPEG=1 gpujpeg ;;
    gpujpeg128)  # many clients per GPU, where queued --gpu-jpeg batches won on 820265e
      { for _ in 1 2; do
          timeout 90 python3 bench/worker_ab.py cpu "$workers" 128
          timeout 90 python3 bench/worker_ab.py cpu "$workers" 128 --gpu-jpeg
        done
      } 2>&1 | grep -v "No registered plugin" | tee "$OUT/gpujpeg128.log" | grep -E "img/s|busy" ;;
    launchers)  # instance_count 2 gives classify's batcher two bound threads on the GPU
      { for flag in --gpu-jpeg --gpu-jpeg --gpu-jpeg ""; do
          for n in 1 2; do
            instances "$n"; echo "== instance_count $n $flag"
            timeout 90 python3 bench/worker_ab.py cpu "$workers" 32 $flag
          done
        done
        instances 1
      } 2>&1 | grep -v "No registered plugin" | tee "$OUT/launchers.log" | grep -E "^==|img/s|busy" ;;
    spy)  # py-spy on the device process at 32 clients with --gpu-jpeg: who holds the interpreter lock
      # (the py-spy wheel carried in .probe/pyspy; collapsed stacks and their sums under $OUT)
      [ -x /tmp/pyspy/bin/py-spy ] || python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .probe/pyspy/*.whl
      if [ -x /tmp/pyspy/bin/py-spy ]; then
        { SPY_OUT="$OUT" PYSPY=/tmp/pyspy/bin/py-spy SPY_NATIVE="${SPY_NATIVE:-}" timeout 150 python3 bench/worker_ab.py spy "$workers" 32 --gpu-jpeg
          python3 bench/spy_report.py "$OUT"/spy-*.txt --top 60 > "$OUT/report-spy.txt"
        } 2>&1 | grep -v "No registered plugin" | tee "$OUT/spy.log" | tail -8
      else echo "spy: py-spy is not installed (carry .probe/pyspy/*.whl)"; fi ;;
    replicas)  # would more device processes lift the rate at 32 clients? whole shims side by side on the
      # one GPU (worker_ab.py replicas), the clients spread over them, against one shim, alternating
      { for flag in "" --gpu-jpeg; do
          for _ in 1 2; do
            echo "== one shim, $workers workers $flag"; timeout 120 python3 bench/worker_ab.py cpu "$workers" 32 $flag
            half=$(( workers > 1 ? workers / 2 : 1 ))
            echo "== two shims, $half workers each $flag"
            timeout 120 python3 bench/worker_ab.py replicas 2 "$half" 32 $flag
            echo "== two shims, $workers workers each $flag"; timeout 120 python3 bench/worker_ab.py replicas 2 "$workers" 32 $flag
          done
        done
      } 2>&1 | grep -v "No registered plugin" | tee "$OUT/replicas.log" | grep -E "^==|img/s|busy" ;;
    jpegstages)  # where the device's cycle goes with and without --gpu-jpeg
      { timeout 90 python3 bench/worker_ab.py stages "$workers" 32
        timeout 90 python3 bench/worker_ab.py stages "$workers" 32 --gpu-jpeg
      } 2>&1 | grep -v "No registered plugin" | tee "$OUT/jpegstages.log" | tail -60 ;;
    jpegcall)
      OUT="$OUT" timeout 120 python3 bench/jpeg_call_probe.py 2>&1 \
        | grep -vE "^Failed to load nv(jpeg2k|tiff)|^Note: If using nvImageCodec|_ext\]" | tee "$OUT/jpegcall.log" ;;
    jpegmemory)
      for args in "16 3024 4032" "32 3024 4032" "64 3024 4032" "128 3024 4032" "64 1080 1920" "1024 1080 1920" \
                  "64 6000 6000"; do
        timeout 60 python3 bench/jpeg_memory_probe.py $args 2>&1 | grep -E "MiB|missed|Error"
        echo "   (rc ${PIPESTATUS[0]})"
      done | tee "$OUT/jpegmemory.log" ;;
    nvjpeg)
      OUT="$OUT" timeout 150 python3 bench/nvjpeg_probe.py 2>&1 | tee "$OUT/nvjpeg.log" \
        | grep -vE "^Failed to load nv(jpeg2k|tiff)|^Note: If using nvImageCodec|(nvjpeg2k|nvtiff)_ext\]" | tail -120 ;;
  esac
done
for d in bench bench-single bench-threads bench-gpujpeg; do [ -d "$OUT/$d" ] && tar czf "$OUT/$d.tgz" -C "$OUT" "$d" && rm -rf "${OUT:?}/$d"; done
ls -la "$OUT"
