#!/usr/bin/env bash
# Install shoal into ./.venv on the one pinned version set (constraints.txt).
# Usage: ./install.sh [EXTRAS]      e.g. ./install.sh test
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: pip then takes the local CPU build, never a multi-GB CUDA one.
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".${1:+[$1]}"
