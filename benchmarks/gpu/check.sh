#!/usr/bin/env bash
# One prepared GPU check: everything in this project that needs CUDA, measured in one short call (issue 11).
#
#   on the GPU machine (device tool `run`, carry=["benchmarks/gpu/wheels"], after bash benchmarks/gpu/prepare.sh):
#     bash benchmarks/gpu/check.sh
#   here, as a dry run on the CPU (tests/test_gpu_check.py runs this):
#     bash benchmarks/gpu/check.sh --cpu --tiny [--out DIR]
#
# Stages, each under `timeout` from one budget (--budget, default 470 s; --tiny 200 s), so a slow stage cannot eat
# the rest:
#   0. env        install the carried wheels into a private --target (GPU only), versions, GPU name -> env.json
#   1. sd_step    benchmarks/bench_sd_step.py: SD-2.1-base-shaped random UNet + VAE, 512 px, fp16, Perp-Neg, SDS and
#                 SDI at t = 980/615/250, ours and the official loop, peak memory            -> sd_step.json
#   2. train      benchmarks/bench_train_step.py: the whole step (NeRF render 512 + VAE encode with grad + UNet calls
#                 + backward + Adam) of SDI through compose_config + Trainer, a random-weight SD-2.1-base-shaped
#                 pipeline directory (benchmarks/gpu/make_pipeline.py) as prior.model     -> train_step.json
#   3. methods    the same whole step for SDS and every other conf/guidance/*.yaml; a failed method is a row
#                                                                                           -> train_methods.json
#   3b. memory    benchmarks/bench_memory.py: the SDI step's memory part by part (render by lever at 512 px on a
#                 fitted dense object, VAE encode + backward with / without checkpointing, whole steps of SDI, SDS
#                 and VSD with the memory levers off / on)           -> summary.json["memory"] (8-file limit)
#   4. tcnn       tinycudann hash grid against the torch one, or a clear "not available"     -> tcnn.json
#   4b. gaussians benchmarks/gpu/gaussians.py: the torch Gaussian rasterizer against gsplat (parity) and the
#                 training-render step at 512 px with 100k Gaussians, each backend   -> "gaussians" in summary.json
#   5. pytest     the test suite with SDI_TEST_DEVICE=cuda (tests that take the test_device fixture run on CUDA),
#                 with whatever time is left                                                -> pytest.json
# Then summary.json and one printed table. Everything lands in $OUT (the device tool's) or --out; the whole log is
# check.log there (8 files in all). Exit code 0 when every stage ran (a failed method or test is a result, not an
# error of the check); 1 when a stage crashed or timed out.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CPU=0
TINY=0
BUDGET=""
OUTDIR="${OUT:-$ROOT/outputs/gpu_check}"
WHEELS="$ROOT/benchmarks/gpu/wheels"
INSTALL=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --tiny) TINY=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --out) OUTDIR="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --install) INSTALL=yes ;;
    --no-install) INSTALL=no ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$CPU" = 1 ] && [ "$TINY" = 0 ]; then
  echo "check.sh: --cpu runs the tiny sizes only (SD 2.1-base at 512 px takes minutes per step on a CPU): add --tiny" >&2
  exit 2
fi
[ -n "$BUDGET" ] || { [ "$TINY" = 1 ] && BUDGET=200 || BUDGET=470; }
# SDI_CHECK_SLACK=N multiplies the budget and every stage's share: for the CPU dry run on a shared, loaded machine
# (tests/test_gpu_check.py), where the seconds mean nothing; a device run keeps 1 (its budget is device time)
SLACK="${SDI_CHECK_SLACK:-1}"
case "$SLACK" in '' | *[!0-9]* | 0) echo "check.sh: SDI_CHECK_SLACK=$SLACK must be a positive integer" >&2; exit 2 ;; esac
BUDGET=$((BUDGET * SLACK))
PY="${PYTHON:-python3}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sdi-gpu-check.XXXXXX")"
STAGES="$WORK/stages.tsv"
: >"$STAGES"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export HF_HOME="$WORK/hf" DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
if [ "$CPU" = 1 ]; then
  DEVICE=cpu
  # a shared small CPU: one thread (two threads on two busy cores ran a tiny UNet 100x slower here)
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
else
  DEVICE=cuda
fi
START=$SECONDS

# the seconds a stage may take: its own share, or what is left of the budget less a reserve for the summary
stage_limit() {
  local want=$(($1 * SLACK)) left=$((BUDGET - (SECONDS - START) - 8))
  [ "$left" -lt "$want" ] && want=$left
  [ "$want" -lt 1 ] && want=1
  echo "$want"
}

# run_stage NAME WANT_SECONDS CMD...: under timeout; records name, exit code, seconds, limit
run_stage() {
  local name=$1 want=$2
  shift 2
  local limit t0 rc
  limit=$(stage_limit "$want")
  t0=$SECONDS
  echo
  echo "=== stage $name (limit ${limit}s, $((SECONDS - START))s of ${BUDGET}s used) ==="
  timeout -k 10 "$limit" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$STAGES"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "!!! stage $name ran past its ${limit}s and was stopped"
  return 0
}

main() {
  cd "$ROOT" || return 1
  echo "sdi-lab GPU check: device=$DEVICE tiny=$TINY budget=${BUDGET}s out=$OUTDIR python=$PY"
  # ---- 0. the carried wheels (GPU machine: nothing can be fetched there) -----------------------------------
  local install_note
  if [ "$INSTALL" = no ] || { [ "$INSTALL" = auto ] && [ "$CPU" = 1 ]; }; then
    install_note="not installed (--cpu dry run or --no-install): the installed environment"
  elif ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "$WHEELS"/*.whl; then
      export PYTHONPATH="$WORK/site"
      install_note="installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $WORK/site"
    else
      install_note="pip install of $WHEELS failed: the installed environment"
    fi
  else
    install_note="no wheels at $WHEELS: the installed environment"
  fi
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
  echo "$install_note"
  run_stage env 30 "$PY" "$ROOT/benchmarks/gpu/report.py" env --device "$DEVICE" --install "$install_note" \
    --out "$OUTDIR/env.json"

  # ---- 1. the prior's step alone ------------------------------------------------------------------------
  if [ "$TINY" = 1 ]; then
    run_stage sd_step 30 "$PY" "$ROOT/benchmarks/bench_sd_step.py" --arch tiny --device "$DEVICE" --dtype fp32 \
      --resolution 64 --t 250 --iters 1 --warmup 0 --threads 1 --out "$OUTDIR/sd_step.json"
  else
    run_stage sd_step 80 "$PY" "$ROOT/benchmarks/bench_sd_step.py" --device cuda --dtype fp16 --resolution 512 \
      --t 980 615 250 --iters 5 --warmup 2 --out "$OUTDIR/sd_step.json"
  fi

  # ---- 2. + 3. whole training steps through Trainer -------------------------------------------------------
  local pipe="$WORK/pipe" arch=sd21-base tiny_args=() methods
  if [ "$TINY" = 1 ]; then
    arch=tiny
    tiny_args=(--tiny --threads 1)
  fi
  run_stage pipeline 50 "$PY" "$ROOT/benchmarks/gpu/make_pipeline.py" "$pipe" --arch "$arch" --device "$DEVICE"
  # the methods: every conf/guidance option but a per-method variant (sds_x0, ...: a defaults entry naming its base)
  methods=$(cd "$ROOT/conf/guidance" && grep -L -E '^  - [a-z][a-z0-9_]*$' *.yaml | sed 's/\.yaml$//' \
    | grep -vx ddim_inversion | tr '\n' ' ')
  local n_methods per_method
  n_methods=$(echo "$methods" | wc -w)
  if [ "$TINY" = 1 ]; then
    run_stage train 30 "$PY" "$ROOT/benchmarks/bench_train_step.py" --model "$pipe" "${tiny_args[@]}" \
      --guidance ddim_inversion --steps 2 --warmup 0 --device "$DEVICE" --out "$OUTDIR/train_step.json"
    run_stage methods 40 "$PY" "$ROOT/benchmarks/bench_train_step.py" --model "$pipe" "${tiny_args[@]}" \
      --guidance $methods --steps 1 --warmup 0 --device "$DEVICE" --out "$OUTDIR/train_methods.json"
  else
    run_stage train 75 "$PY" "$ROOT/benchmarks/bench_train_step.py" --model "$pipe" --guidance ddim_inversion \
      --steps 50 --warmup 3 --method-seconds 45 --device cuda --out "$OUTDIR/train_step.json"
    # the stage's time shared between the methods, less ~10 s each to build a Trainer and load the pipeline
    per_method=$(((120 - 10 * n_methods) / (n_methods > 0 ? n_methods : 1)))
    [ "$per_method" -lt 5 ] && per_method=5
    run_stage methods 120 "$PY" "$ROOT/benchmarks/bench_train_step.py" --model "$pipe" --guidance $methods \
      --steps 30 --warmup 2 --method-seconds "$per_method" --device cuda --out "$OUTDIR/train_methods.json"
  fi
  # ---- 3b. memory of the SDI step part by part, levers off / on (issue 20; into summary.json, not a 9th file) ----
  if [ "$TINY" = 1 ]; then
    run_stage memory 60 "$PY" "$ROOT/benchmarks/bench_memory.py" render vae steps --device "$DEVICE" --threads 1 \
      --resolutions 32 --state blob --levers off ckpt --chunk-rays 256 --model "$pipe" --guidance ddim_inversion \
      --resolution 32 --scene nerf_cpu --steps 1 --warmup 0 --out "$WORK/memory.json"
  else
    run_stage memory 100 "$PY" "$ROOT/benchmarks/bench_memory.py" render vae steps --device cuda \
      --resolutions 512 --state dense --levers off no_normals ckpt fp16 ckpt_fp16 fd --model "$pipe" \
      --guidance ddim_inversion sds vsd --resolution 512 --steps 2 --warmup 1 --method-seconds 8 \
      --out "$WORK/memory.json"
  fi
  rm -rf "$pipe"

  # ---- 4. tinycudann (before the tests: short; the tests take what is left) ---------------------------------
  run_stage tcnn 15 "$PY" "$ROOT/benchmarks/gpu/report.py" tcnn --device "$DEVICE" --out "$OUTDIR/tcnn.json"

  # ---- 4b. 3D Gaussians: torch rasterizer vs gsplat (parity), step time at 512 px with 100k Gaussians -----------
  # (its JSON is folded into summary.json: the device tool brings back 8 files at most)
  if [ "$TINY" = 1 ]; then
    run_stage gaussians 25 "$PY" "$ROOT/benchmarks/gpu/gaussians.py" --device "$DEVICE" --n 500 --resolution 24 \
      --parity-n 200 --iters 1 --warmup 0 --threads 1 --out "$WORK/gaussians.json"
  else
    run_stage gaussians 60 "$PY" "$ROOT/benchmarks/gpu/gaussians.py" --device cuda --n 100000 --resolution 512 \
      --batch 1 --iters 5 --warmup 2 --out "$WORK/gaussians.json"
  fi

  # ---- 5. the test suite on the device ---------------------------------------------------------------------
  local pytest_args=(-p no:cacheprovider -v --timeout 120 --junitxml "$WORK/junit.xml")
  if [ "$TINY" = 1 ]; then  # only the tests that take the device (the whole suite is CI's job)
    pytest_args+=(-k "on_device" "$ROOT/tests/test_gpu_check.py")
  else
    "$PY" -c "import xdist" 2>/dev/null && pytest_args+=(-n 8)
    pytest_args+=(-m "not slow and not slurm" --deselect "tests/test_gpu_check.py::test_check_sh_cpu_tiny_end_to_end"
      "$ROOT/tests")
  fi
  echo "(pytest output: the last lines below; every test's outcome in pytest.json)"
  run_stage pytest "$([ "$TINY" = 1 ] && echo 40 || echo 100)" env SDI_TEST_DEVICE="$DEVICE" \
    "$PY" -m pytest "${pytest_args[@]}" >"$WORK/pytest.log" 2>&1
  tail -n 15 "$WORK/pytest.log"
  run_stage pytest_report 15 "$PY" "$ROOT/benchmarks/gpu/report.py" pytest --log "$WORK/pytest.log" \
    --junit "$WORK/junit.xml" --device "$DEVICE" --out "$OUTDIR/pytest.json"

  # ---- summary ---------------------------------------------------------------------------------------------
  "$PY" "$ROOT/benchmarks/gpu/report.py" summary --dir "$OUTDIR" --stages "$STAGES" --budget "$BUDGET" \
    --seconds "$((SECONDS - START))" --extra "gaussians=$WORK/gaussians.json" "memory=$WORK/memory.json" \
    --out "$OUTDIR/summary.json"
}

main 2>&1 | tee "$OUTDIR/check.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
