#!/usr/bin/env bash
# DVC overhead: wall time of the whole demo pipeline from a clean state, and of a no-op repro.
#
# What it measures, in a throwaway copy of the project (cxr/, stages/, dvc.yaml, params.yaml,
# pyproject.toml, .dvcignore) with its own git + DVC repository and MLflow store:
#   full:  `dvc repro` from clean (download -> split -> preprocess -> train -> evaluate ->
#          gradcam), timed as one command;
#   no-op: `dvc repro` again with nothing changed: only DVC's own checking of hashes and
#          params, which every `dvc repro` / `dvc exp run` pays before any stage runs;
#   cli:   `dvc --version`, DVC's start-up alone, for scale.
# It prints the wall times and the no-op's share of the full run. Both runs happen in the same
# invocation, on the same machine state, so the share holds on a noisy shared machine.
#
# The project's own files are never touched: MLflow goes to a sqlite file in the temp dir
# (MLFLOW_TRACKING_URI), DVC's cache and lock file live in the copy.

set -euo pipefail

usage() {
    cat <<'EOF'
usage: bench/dvc_bench.sh [--epochs N] [--patients N] [--set KEY=VALUE]... [--keep] [-h]

Times `dvc repro` of the whole demo pipeline from clean, then a no-op `dvc repro`, in a temp
copy of the project. Default: params.yaml as it is in the project.

  --epochs N        override `epochs` in the copy's params.yaml     (env: EPOCHS)
  --patients N      override `data.demo_patients`                   (env: DEMO_PATIENTS)
  --set KEY=VALUE   override any dotted key of params.yaml, e.g. --set image_size=32 or
                    --set runtime.threads=1 (repeatable; env: SET="KEY=VALUE KEY=VALUE");
                    VALUE is read as YAML
  --keep            keep the temp copy and print where it is        (env: KEEP=1)
  -h, --help        this help

Run from anywhere; Python and DVC come from the project's .venv (or $PYTHON).
Quick check:  bench/dvc_bench.sh --epochs 1 --patients 40 --set data.demo_max_side=200
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
overrides=()
[[ -n "${EPOCHS:-}" ]] && overrides+=("epochs=$EPOCHS")
[[ -n "${DEMO_PATIENTS:-}" ]] && overrides+=("data.demo_patients=$DEMO_PATIENTS")
read -r -a env_sets <<<"${SET:-}"
overrides+=("${env_sets[@]}")
keep="${KEEP:-0}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --epochs) overrides+=("epochs=${2:?--epochs needs a value}"); shift 2 ;;
        --patients) overrides+=("data.demo_patients=${2:?--patients needs a value}"); shift 2 ;;
        --set) overrides+=("${2:?--set needs KEY=VALUE}"); shift 2 ;;
        --keep) keep=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

work="$(mktemp -d "${TMPDIR:-/tmp}/dvc_bench.XXXXXX")"
if [[ "$keep" == 1 ]]; then
    trap 'echo "kept: $work"' EXIT
else
    trap 'rm -rf "$work"' EXIT
fi
project="$work/project"
mkdir -p "$project"

# The project as it is now, without caches or outputs.
for name in cxr stages dvc.yaml params.yaml pyproject.toml .dvcignore; do
    cp -R "$REPO/$name" "$project/"
done
find "$project" -name __pycache__ -type d -prune -exec rm -rf {} +

# params.yaml overrides, merged into the copy (like `dvc exp run -S`, but before any run).
if [[ ${#overrides[@]} -gt 0 ]]; then
    "$PYTHON" - "$project/params.yaml" "${overrides[@]}" <<'EOF'
import sys
from pathlib import Path

import yaml

path = Path(sys.argv[1])
params = yaml.safe_load(path.read_text())
for item in sys.argv[2:]:
    key, sep, value = item.partition("=")
    if not sep:
        sys.exit(f"override {item!r} is not KEY=VALUE")
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    if leaf not in node:
        sys.exit(f"override {key!r}: no such key in params.yaml")
    node[leaf] = yaml.safe_load(value)
path.write_text(yaml.safe_dump(params, sort_keys=False))
EOF
fi

venv_bin="$(dirname "$PYTHON")"
export PATH="$venv_bin:$PATH"  # stages run `python -m ...` from the same venv
export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
export DVC_NO_ANALYTICS=1
export GIT_AUTHOR_NAME=bench GIT_COMMITTER_NAME=bench
export GIT_AUTHOR_EMAIL=bench@example.com GIT_COMMITTER_EMAIL=bench@example.com

cd "$project"
git init -q
"$PYTHON" -m dvc init -q

now() { "$PYTHON" -c 'import time; print(time.time())'; }
elapsed() { "$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$@"; }

# Runs a command into a log, returns its wall seconds in $seconds; stops on failure.
timed() {
    local log="$1"
    shift
    local start end
    start="$(now)"
    if ! "$@" >"$log" 2>&1; then
        echo "failed: $*  (last lines of $log below)" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    end="$(now)"
    seconds="$(elapsed "$start" "$end")"
}

echo "project copy: $project"
if [[ ${#overrides[@]} -gt 0 ]]; then
    echo "overrides: ${overrides[*]}"
else
    echo "params.yaml as committed"
fi
"$PYTHON" - <<'EOF'
import yaml

p = yaml.safe_load(open("params.yaml"))
d = p["data"]
print(
    f"data.source={d['source']} demo_patients={d['demo_patients']} "
    f"sides={d['demo_min_side']}-{d['demo_max_side']} image_size={p['image_size']} "
    f"epochs={p['epochs']} batch_size={p['batch_size']} arch={p['model']['arch']}"
)
r = p["runtime"]
print(f"runtime: device={r['device']} threads={r['threads']} workers={r['workers']}")
EOF

timed "$work/cli.log" "$PYTHON" -m dvc --version
cli="$seconds"
echo "dvc repro from clean ..."
timed "$work/full.log" "$PYTHON" -m dvc repro
full="$seconds"
stages_run="$(grep -c "^Running stage" "$work/full.log" || true)"
timed "$work/noop.log" "$PYTHON" -m dvc repro
noop="$seconds"
if grep -q "^Running stage" "$work/noop.log"; then
    echo "warning: the second dvc repro ran stages; it was not a no-op:" >&2
    grep "^Running stage" "$work/noop.log" >&2
fi

"$PYTHON" - "$full" "$noop" "$cli" "$stages_run" <<'EOF'
import sys

full, noop, cli = map(float, sys.argv[1:4])
print(f"\n{'run':<40} {'wall s':>8} {'÷ full':>8}")
print(f"{'dvc repro from clean (' + sys.argv[4] + ' stages run)':<40} {full:>8.2f} {1:>8.3f}")
print(f"{'dvc repro, nothing changed (no-op)':<40} {noop:>8.2f} {noop / full:>8.3f}")
print(f"{'dvc --version (start-up alone)':<40} {cli:>8.2f} {cli / full:>8.3f}")
print(f"\nno-op share of the full run: {100 * noop / full:.1f}%")
EOF
