#!/usr/bin/env bash
# What `make test` needs outside the virtualenv: redis-server (a Redis answering on
# 127.0.0.1:6379; tests that restart or flood Redis start their own on a free port) and
# prometheus + promtool (tests/deploy/test_prometheus.py runs a real server). Installs
# Debian's packages when they are missing (needs root and apt), starts Redis when none answers.
set -euo pipefail

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || missing+=(prometheus)
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "make test needs: ${missing[*]} (Debian packages); install them and retry" >&2
        exit 1
    fi
    echo "installing ${missing[*]} (Debian packages) for the tests" >&2
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null
