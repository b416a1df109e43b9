#!/usr/bin/env bash
# Before/after figures for a change to the request path, run alternately on one machine:
#   git worktree add /tmp/before <base commit>
#   bench/alternate.sh /tmp/before [rounds]     (default 2; the ceiling with the slower stand-in: one more)
# Both revisions run with this checkout's .venv and this checkout's bench/ceiling.py (the table's
# columns), each daemon from its own tree. Prints the table rows of ceiling.py (slower and fast
# stand-in), throughput.py (--log-level info) and latency.py for "before" and "after".
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:?usage: bench/alternate.sh <before checkout> [rounds]}
rounds=${2:-2}
PY=$PWD/.venv/bin/python
cp bench/ceiling.py "$before/bench/ceiling.py.alternate"
run() {  # rev script args...
  local rev=$1 script=$2; shift 2
  local dir=$PWD file=$script
  if [ "$rev" = before ]; then dir=$before; [ "$script" = ceiling.py ] && file=ceiling.py.alternate; fi
  echo "== $rev $script $*"
  "$PY" "$dir/bench/$file" "$@" 2>&1 | grep "^|" | grep -v "^|--" || true
}
for _ in $(seq 1 $((rounds + 1))); do for rev in before after; do run $rev ceiling.py --requests 1000 --sim-cpu-ms 1.2; done; done
for _ in $(seq 1 "$rounds"); do for rev in before after; do run $rev ceiling.py --requests 1000 --sim-process; done; done
for _ in $(seq 1 "$rounds"); do for rev in before after; do run $rev throughput.py --requests 3000 --log-level info; done; done
for rev in before after; do run $rev latency.py; done
