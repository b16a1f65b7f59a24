#!/usr/bin/env bash
# The GPU suite: one command on a fresh GPU machine, from the project's tree, in under 8 minutes.
#
#   bash benchmarks/gpu_suite.sh            # on a machine with a CUDA GPU
#   bash benchmarks/gpu_suite.sh --quick    # the same plumbing on a CPU, tiny shapes (a check)
#
# Needs python3 with torch, triton and transformers (the GPU machines' image has them); the
# project itself is used in place, not installed. Optional comparison libraries (Liger-Kernel,
# cut-cross-entropy) come from wheels in .whl/ when present (benchmarks/fetch_wheels.sh puts them
# there on a machine with package-index access), else those variants are reported as absent.
#
# Parts, in the order the answers matter, each with its own time limit so the whole stays inside 8
# minutes:
#   gpu-tests  (a) pytest on the kernel test files: on CUDA every kernel and backend against the
#              float64 reference at multi-slice, multi-chunk, multi-band shapes (the first call
#              compiles every Triton kernel: the limit leaves room for it)
#   compile    python -m benchmarks.compile_report (CPU only, runs beside gpu-tests)
#   kernels    (b) python -m benchmarks.kernels: fwd+bwd at N=4096 and 16384 first, the fused
#              backends against torch.compile of the materialised path and Liger first (its own
#              deadline stops new measurements in time; N=65536 last)
#   calibrate  (c) python -m benchmarks.kernels --calibrate: cuBLAS mm/addmm with fp32 outputs at
#              the chunked backward's shapes
#   step       (d) python -m benchmarks.step
#   packed     python -m benchmarks.packed_vs_padded (packing and the memory planner's prediction)
#   cuda       python -m benchmarks.cuda_vs_triton: the cuda backend (kernels/csrc) timed beside
#              triton and each checked against the other at full size; needs build/libaltpo_csrc.so
#              (built here by scripts/build_csrc.sh, beside the tests, when nvcc is present; else
#              carry a prebuilt build/ folder)
#   report     python -m benchmarks.report -> benchmarks/results/<date>-<card>.json/.md/.png
# A part's limit shrinks to what is left of the suite's budget (SUITE_BUDGET_S, default 450 s), so
# the whole run ends inside 8 minutes even when early parts run long. kernels and step write their
# JSON as they go, so a part cut off by its limit still reports what it did.
# When $OUT is set (the lent-GPU tool), the results and logs are copied there as well.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
quick=0
out_dir="$root/benchmarks/results"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --out-dir) out_dir="$2"; shift ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (use --quick or --out-dir DIR)" >&2; exit 2 ;;
    esac
    shift
done

work="$(mktemp -d /tmp/altpo-suite.XXXXXX)"
[ "$quick" = 1 ] && [ "$out_dir" = "$root/benchmarks/results" ] && out_dir="$work/results"
mkdir -p "$out_dir"
log="$work/suite.log"
t_start=$SECONDS
say() { echo "[suite +$((SECONDS - t_start))s] $*" | tee -a "$log" >&2; }

# The project's packages in place: altpo from the root, altpo_kernels from kernels/altpo_kernels/.
if ! "$PY" -c "import altpo_kernels, altpo" >/dev/null 2>&1; then
    export PYTHONPATH="$root:$root/kernels${PYTHONPATH:+:$PYTHONPATH}"
fi
if ls "$root"/.whl/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$work/site" "$root"/.whl/*.whl >>"$log" 2>&1; then
        # appended, so the image's own torch and triton stay first on the path
        export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$work/site"
        say "wheels installed: $(cd "$root/.whl" && ls *.whl | tr '\n' ' ')"
    else
        say "wheels in .whl/ did not install; their variants will be reported absent"
    fi
fi
export PYTHONUNBUFFERED=1

if [ "$quick" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA GPU visible: run with --quick for the CPU check of this script"
    exit 2
fi
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv 2>&1 | tee -a "$log"

: >"$work/parts.txt"
budget="${SUITE_BUDGET_S:-450}"
report_reserve=25
fit() {  # fit LIMIT: the limit, shrunk to what the suite's budget has left after the report
    local left=$((budget - (SECONDS - t_start) - report_reserve))
    [ "$left" -lt 10 ] && left=10
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
part() {  # part NAME LIMIT_SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    say "start $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $((SECONDS - t0))" >>"$work/parts.txt"
    say "end $name: exit $rc after $((SECONDS - t0))s"
    tail -n 25 "$work/$name.log" | tee -a "$log"
    return 0
}

if [ "$quick" = 1 ]; then
    tests=(tests/kernels/test_kernel_input_errors.py)
    q=(--quick)
    limits=(120 120 300 60 300 120)
    packed_args=(--quick --workloads tofu)
else
    tests=()
    for f in tests/kernels/test_chunked_backward.py tests/kernels/test_linear_logprobs.py \
             tests/kernels/test_altpo_loss.py tests/kernels/triton/test_triton_logprobs.py \
             tests/kernels/triton/test_triton_segment_ops.py tests/kernels/test_kernel_input_errors.py; do
        [ -f "$f" ] && tests+=("$f")
    done
    q=()
    # gpu-tests (first-time Triton compiles included), compile (beside them), kernels, calibrate,
    # step, packed
    limits=(130 150 170 30 90 30)
    packed_args=(--budget-s 1)
fi

# compile is CPU work (ptxas): it runs beside the kernel tests, before anything is timed
( part compile "${limits[1]}" "$PY" -m benchmarks.compile_report "${q[@]}" --out "$work/compile.json"
  if [ "$quick" = 0 ] && [ ! -f build/libaltpo_csrc.so ] && { command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; }; then
      part csrc-build 120 bash scripts/build_csrc.sh
  fi ) &
compile_pid=$!
part gpu-tests "$(fit "${limits[0]}")" "$PY" -m pytest -q -p no:cacheprovider --junitxml="$work/gpu-tests.xml" "${tests[@]}"
wait "$compile_pid"
lim=$(fit "${limits[2]}")
# the deadline leaves room for the measurement in flight when it passes (at most ~30 s at N=65536)
part kernels "$lim" "$PY" -m benchmarks.kernels "${q[@]}" --deadline $((lim * 3 / 4)) --out "$work/kernels.json"
part calibrate "$(fit "${limits[3]}")" "$PY" -m benchmarks.kernels --calibrate "${q[@]}" --out "$work/calibrate.json"
part step "$(fit "${limits[4]}")" "$PY" -m benchmarks.step "${q[@]}" --out "$work/step.json"
if [ "$quick" = 0 ] && [ -f build/libaltpo_csrc.so ]; then
    part cuda "$(fit 90)" "$PY" -m benchmarks.cuda_vs_triton --budget 0.5 --out "$work/cuda_vs_triton.json"
fi
if [ -f benchmarks/packed_vs_padded.py ]; then
    part packed "$(fit "${limits[5]}")" "$PY" -m benchmarks.packed_vs_padded "${packed_args[@]}" --out "$work/packed.json"
fi

say "report"
"$PY" -m benchmarks.report --kernels "$work/kernels.json" --step "$work/step.json" \
    --compile "$work/compile.json" --packed "$work/packed.json" --pytest-junit "$work/gpu-tests.xml" --parts "$work/parts.txt" \
    --out-dir "$out_dir" >"$work/report.log" 2>&1
rc=$?
cat "$work/report.log" | tee -a "$log"
say "done in $((SECONDS - t_start))s; results in $out_dir"

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$out_dir"/*.json "$out_dir"/*.md "$out_dir"/*.png "$OUT"/ 2>/dev/null
    cp "$work/calibrate.json" "$work/cuda_vs_triton.json" "$OUT"/ 2>/dev/null
    tar -czf "$OUT/suite-logs.tar.gz" -C "$work" . 2>/dev/null
    cp "$log" "$OUT/suite.log"
fi
exit $rc
