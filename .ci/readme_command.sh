#!/usr/bin/env bash
# Runs the N-th command of the README's "Two commands" block exactly as written there, so the
# README and CI cannot drift apart. pytest's exit code 5 (no tests collected) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
n="$1"
cmd="$(awk '/^<!-- ci-commands -->/{on=1; next} on && /^```/{if (started) exit; started=1; next} on && started && NF' README.md | sed -n "${n}p")"
if [ -z "$cmd" ]; then echo "README command $n not found" >&2; exit 1; fi
echo "+ $cmd"
set +e
bash -c "set -o pipefail; $cmd"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
