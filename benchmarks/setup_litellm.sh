#!/usr/bin/env bash
# Install LiteLLM's proxy into its own virtualenv, .venv-litellm (gitignored).
#
# LiteLLM pins versions of pydantic, openai, fastapi, ... that conflict with tollway's own
# dependencies, so it never goes into .venv. benchmarks/proxy_overhead.py runs the proxy from
# here as a subprocess (`.venv-litellm/bin/litellm --config ...`) on 127.0.0.1.
#
# Version: 1.108.7 is the newest litellm[proxy] that installs here (2026-11-29). Since the 1.10x
# releases its proxy refuses to start without a master key (unless an override variable permits a
# weak one): benchmarks/proxy_overhead.py gives it a key and sends it.
# The 1.82.7/1.82.8 and 1.107.0 releases were compromised and pulled; never pin those.
#
# Usage: bash benchmarks/setup_litellm.sh   (idempotent; ~40 s the first time, ~680 MB)
set -euo pipefail

LITELLM_VERSION="${LITELLM_VERSION:-1.108.7}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-litellm"
PYTHON="${PYTHON:-python3.11}"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -P -c "import importlib.metadata as m, sys; sys.exit(m.version('litellm') != '$LITELLM_VERSION')" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "litellm[proxy]==$LITELLM_VERSION"
fi
"$VENV/bin/python" -P -c "import importlib.metadata as m; print('litellm', m.version('litellm'), 'in', '$VENV')"
