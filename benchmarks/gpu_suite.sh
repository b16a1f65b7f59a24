#!/usr/bin/env bash
# The GPU suite: one command on a fresh GPU machine, from the project's tree, in at most 10 minutes
# on one H100/H200. It exits non-zero when any part fails, when a correctness check fails, or when
# no GPU is present (said within seconds).
#
#   bash benchmarks/gpu_suite.sh                 # on a machine with a CUDA GPU
#   bash benchmarks/gpu_suite.sh --budget 300    # only what fits 300 s, lowest priority dropped first
#   bash benchmarks/gpu_suite.sh --quick         # the same plumbing on a CPU, tiny shapes (a check)
#
# Needs python3 with torch, triton and transformers; the project is used in place, not installed.
# Optional peers (TRL, Liger-Kernel, cut-cross-entropy) come from wheels in .whl/ when present
# (benchmarks/fetch_wheels.sh puts them there where a package index is reachable), else those
# variants are reported absent.
#
# Parts in priority order (the first five answer within about 5 minutes), with their time limits
# on a GPU:
#   gpu-tests    210 s  pytest on the kernel test files on CUDA: every kernel and backend against
#                       the float64 reference (the first call compiles every Triton kernel)
#   probe         30 s  python -m benchmarks.first_checks probe: addmm(out_dtype=fp32), beta=1
#   determinism   60 s  python -m benchmarks.first_checks determinism: two runs bit-identical
#   kernels      180 s  python -m benchmarks.kernels --tokens 4096 16384: fwd+bwd against TRL's
#                       fused head, torch.compile (static and dynamic), Liger and CCE, with memory
#   calibrate     30 s  cuBLAS mm/addmm with fp32 outputs at the chunked backward's shapes
#   bands         60 s  python -m benchmarks.kernels --band-sweep: the Triton backward at
#                       vocabulary bands 2048/4096/8192, N = 4096 and 16384; the best and its
#                       workspace, and the default band's time over the best
#   step          90 s  python -m benchmarks.step
#   cuda          60 s  python -m benchmarks.cuda_vs_triton (needs build/libaltpo_csrc.so)
#   packed        30 s  python -m benchmarks.packed_vs_padded
#   compile       --    python -m benchmarks.compile_report (CPU only, runs beside gpu-tests)
#   report        25 s  python -m benchmarks.report -> benchmarks/results/<date>-<card>.json/.md/.png
# --budget SECONDS (default 600, 1500 with --quick; SUITE_BUDGET_S also sets it): parts run in the
# priority order above, and a part starts only when its whole limit fits what is left of the
# budget after the report's reserve; otherwise it is dropped (listed as dropped, not failed), so
# the lowest-priority parts go first and the suite ends within the budget. --parts A,B runs only those parts
# (names above). When $OUT is set, results and logs are copied there.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
quick=0
out_dir="$root/benchmarks/results"
budget="${SUITE_BUDGET_S:-}"
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --out-dir) out_dir="$2"; shift ;;
        --budget) budget="$2"; shift ;;
        --parts) only="$2"; shift ;;
        -h|--help) sed -n '2,39p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (use --quick, --budget SECONDS, --parts A,B or --out-dir DIR)" >&2; exit 2 ;;
    esac
    shift
done
[ -z "$budget" ] && { [ "$quick" = 1 ] && budget=1500 || budget=600; }
case "$budget" in ''|*[!0-9]*) echo "gpu_suite.sh: --budget takes whole seconds, got '$budget'" >&2; exit 2 ;; esac

t_start=$SECONDS
# No GPU: say so first, before any wheel install or test (a few seconds: one torch import).
if [ "$quick" = 0 ]; then
    if ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_suite.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is false, or torch" \
             "is missing); nothing was run. On a CPU, --quick checks this script's plumbing." >&2
        exit 2
    fi
fi

work="$(mktemp -d /tmp/altpo-suite.XXXXXX)"
[ "$quick" = 1 ] && [ "$out_dir" = "$root/benchmarks/results" ] && out_dir="$work/results"
mkdir -p "$out_dir"
log="$work/suite.log"
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
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv 2>&1 | tee -a "$log"

have_csrc=0
[ "$quick" = 0 ] && [ -f build/libaltpo_csrc.so ] && have_csrc=1
if [ "$quick" = 1 ]; then
    tests=(tests/kernels/test_kernel_input_errors.py)
    q=(--quick)
    declare -A limit=([gpu-tests]=120 [probe]=60 [determinism]=120 [kernels]=400 [calibrate]=60
                      [bands]=120 [step]=300 [cuda]=0 [packed]=120 [compile]=150)
    kernel_args=(--quick)
    packed_args=(--quick --workloads tofu)
else
    tests=()
    for f in tests/kernels/test_chunked_backward.py tests/kernels/test_gemm_safety.py \
             tests/kernels/test_linear_logprobs.py tests/kernels/test_altpo_loss.py \
             tests/kernels/triton/test_triton_logprobs.py tests/kernels/triton/test_triton_segment_ops.py \
             tests/kernels/test_kernel_input_errors.py tests/kernels/test_head_transforms.py \
             tests/kernels/triton/test_triton_head_transforms.py tests/kernels/csrc/test_csrc_transforms.py; do
        [ -f "$f" ] && tests+=("$f")
    done
    q=()
    declare -A limit=([gpu-tests]=210 [probe]=30 [determinism]=60 [kernels]=180 [calibrate]=30
                      [bands]=60 [step]=90 [cuda]=60 [packed]=30 [compile]=150)
    kernel_args=(--tokens 4096 16384)
    packed_args=(--budget-s 1)
fi
[ "$have_csrc" = 1 ] || limit[cuda]=0
if [ -n "$only" ]; then
    for p in gpu-tests probe determinism kernels calibrate bands step cuda packed compile; do
        case ",$only," in *",$p,"*) ;; *) limit[$p]=0 ;; esac
    done
fi
report_reserve=25

# Parts in priority order; each starts only if its whole limit fits what is left (part() below).
order=(gpu-tests probe determinism kernels calibrate bands step cuda packed)
planned=()
for p in "${order[@]}"; do [ "${limit[$p]}" = 0 ] || planned+=("$p"); done
say "budget ${budget}s, in order${only:+ (--parts $only)}: ${planned[*]:-nothing} (a part starts only if its limit fits what is left)"
[ "$have_csrc" = 1 ] || [ "$quick" = 1 ] || say "cuda part left out: build/libaltpo_csrc.so is absent (bash scripts/build_csrc.sh)"

: >"$work/parts.txt"
failed=()
left() { echo $((budget - (SECONDS - t_start) - report_reserve)); }
part() {  # part NAME COMMAND...: runs under its limit if that fits the budget; non-zero exit fails
    local name="$1"
    shift
    local lim="${limit[$name]}"
    if [ "$name" != compile ] && [ "$lim" -gt "$(left)" ]; then
        say "drop $name: its ${lim}s limit does not fit the $(left)s left of the budget"
        echo "$name" >>"$work/dropped.txt"
        return 0
    fi
    say "start $name (limit ${lim}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$lim" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $((SECONDS - t0))" >>"$work/parts.txt"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && say "$name ran past its ${lim}s limit"
    say "end $name: exit $rc after $((SECONDS - t0))s"
    tail -n 25 "$work/$name.log" | tee -a "$log"
    [ "$rc" = 0 ] || echo "$name" >>"$work/failed.txt"
    return 0
}
planned_has() { local p; for p in "${planned[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }

# compile is CPU work (ptxas): it runs beside the kernel tests, before anything is timed
( [ "${limit[compile]}" != 0 ] && part compile "$PY" -m benchmarks.compile_report "${q[@]}" --out "$work/compile.json"
  if [ "$quick" = 0 ] && [ ! -f build/libaltpo_csrc.so ] && { command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; }; then
      limit[csrc-build]=120; part csrc-build bash scripts/build_csrc.sh
  fi ) &
compile_pid=$!
planned_has gpu-tests && part gpu-tests "$PY" -m pytest -q -p no:cacheprovider --junitxml="$work/gpu-tests.xml" "${tests[@]}"
wait "$compile_pid"
planned_has probe && part probe "$PY" -m benchmarks.first_checks probe "${q[@]}" --out "$work/probe.json"
planned_has determinism && part determinism "$PY" -m benchmarks.first_checks determinism "${q[@]}" --out "$work/determinism.json"
# the deadline leaves room for the measurement in flight when it passes
planned_has kernels && part kernels "$PY" -m benchmarks.kernels "${kernel_args[@]}" --deadline $((limit[kernels] * 3 / 4)) --out "$work/kernels.json"
planned_has calibrate && part calibrate "$PY" -m benchmarks.kernels --calibrate "${q[@]}" --out "$work/calibrate.json"
planned_has bands && part bands "$PY" -m benchmarks.kernels --band-sweep "${q[@]}" --out "$work/bands.json"
planned_has step && part step "$PY" -m benchmarks.step "${q[@]}" --out "$work/step.json"
planned_has cuda && part cuda "$PY" -m benchmarks.cuda_vs_triton --budget 0.5 --out "$work/cuda_vs_triton.json"
planned_has packed && part packed "$PY" -m benchmarks.packed_vs_padded "${packed_args[@]}" --out "$work/packed.json"

say "report"
"$PY" -m benchmarks.report --kernels "$work/kernels.json" --step "$work/step.json" \
    --compile "$work/compile.json" --packed "$work/packed.json" --pytest-junit "$work/gpu-tests.xml" --parts "$work/parts.txt" \
    --out-dir "$out_dir" >"$work/report.log" 2>&1
report_rc=$?
tee -a "$log" <"$work/report.log"
[ "$report_rc" = 0 ] || echo "report" >>"$work/failed.txt"
[ -f "$work/failed.txt" ] && mapfile -t failed <"$work/failed.txt"
dropped=()
[ -f "$work/dropped.txt" ] && mapfile -t dropped <"$work/dropped.txt"
say "done in $((SECONDS - t_start))s; results in $out_dir"

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$out_dir"/*.json "$out_dir"/*.md "$out_dir"/*.png "$OUT"/ 2>/dev/null
    cp "$work"/calibrate.json "$work"/cuda_vs_triton.json "$work"/probe.json "$work"/determinism.json "$work"/bands.json "$OUT"/ 2>/dev/null
    tar -czf "$OUT/suite-logs.tar.gz" -C "$work" . 2>/dev/null
    cp "$log" "$OUT/suite.log"
fi
if [ "${#failed[@]}" -gt 0 ]; then
    say "FAILED: ${failed[*]} (logs in $work)"
    exit 1
fi
say "all parts passed${dropped[*]:+ (dropped for the budget: ${dropped[*]})}"
exit 0
