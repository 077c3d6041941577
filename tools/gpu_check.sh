#!/usr/bin/env bash
# Check a new GPU machine in one command (environment, GPU test suite, a one-minute benchmark, then
# one PASS or FAIL line): tools/gpu_check.py, from any directory, with the same arguments.
exec "${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/gpu_check.py" "$@"
