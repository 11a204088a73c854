#!/usr/bin/env bash
# checkov's Kubernetes checks over deploy/k8s/ (what a security review flags: root users,
# writable root filesystems, privilege escalation, missing limits and probes, ...). Exits
# non-zero on any failed check; the skipped ones and why are in deploy/checkov.yaml.
#
# checkov runs from its own virtualenv (CHECKOV_VENV, default .cache/checkov-venv), not the
# project's: it installs ~100 packages (400 MB) and pins some older than the project's
# (packaging 23.2, networkx 2.6), so it is kept out of the dev extra and of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CHECKOV_VENV:-.cache/checkov-venv}
VERSION=3.3.30
if ! "$VENV/bin/checkov" --version 2>/dev/null | grep -qx "$VERSION"; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "checkov==$VERSION"
fi
# --skip-download: no call home for guideline texts (the checks ship in the package)
exec "$VENV/bin/checkov" -d deploy/k8s --config-file deploy/checkov.yaml --quiet --skip-download "$@"
