#!/usr/bin/env bash
# One GPU call that does what a session must check at the end: GPU tests, baseline-vs-checkout benchmark rows
# (scripts/gpu-ab.sh), serving on the GPU — scripts/gpu-run.sh with those stages, each under its own time limit.
# Usage: OUT=dir scripts/gpu-final.sh [tests_s] [ab_s] [serve_s]   (.device/wheels, .device/baseline, .device/cache)
exec "$(dirname "$0")/gpu-run.sh" "tests:${1:-240}" "ab:${2:-170}" "serve:${3:-150}"
