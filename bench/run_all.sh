#!/usr/bin/env bash
# Run every benchmark (each writes a record to bench/results/), then regenerate BENCHMARKS.md.
#
#   bench/run_all.sh            # the full sizes: run on a quiet machine (about an hour on 2 CPU cores)
#   bench/run_all.sh --quick    # the small sizes (a few minutes each)
#
# Extra flags go to every script (e.g. --rounds 5). A benchmark whose outputs differ from its baseline
# exits 1: the others still run, the report marks it, and this script exits 1 at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"
status=0
for script in bench_startup bench_image_tokenize bench_build_sequences bench_packing bench_generation bench_eval bench_convert bench_store bench_volumes; do
    echo "== $script $*"
    "$PY" "bench/$script.py" "$@" || { echo "!! $script failed"; status=1; }
done
"$PY" bench/report.py || status=1
exit $status
