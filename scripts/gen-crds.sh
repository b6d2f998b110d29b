#!/usr/bin/env bash
# Regenerates the CRD files from the operator's types (crds/ and the Helm chart's copy).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/raftkv/target}"
cargo run -q -p raftkv-operator -- crd > crds/kvclusters.raftkv.io.yaml
cargo run -q -p raftkv-operator -- crd --backup > crds/kvclusterbackups.raftkv.io.yaml
mkdir -p charts/raftkv-operator/files/crds
cp crds/kvclusters.raftkv.io.yaml crds/kvclusterbackups.raftkv.io.yaml charts/raftkv-operator/files/crds/
echo "regenerated crds/ and the chart's copy"
