#!/usr/bin/env bash
# One-shot step of docker/compose.yaml: puts the models into the /models volume.
#   EVOMERGE_MODELS="base=org/base-model math=org/math-ft code=org/code-ft"
# downloads each repository into /models/<name> (HF_TOKEN for gated models). Without
# EVOMERGE_MODELS it copies the built-in demo's models to /models/demo/<name>, so that
# the cluster can be tried before any real model is chosen.
set -euo pipefail
if [ -z "${EVOMERGE_MODELS:-}" ]; then
  demo=$(python -c "import importlib.resources as r; print(r.files('evomerge.demo'))")
  mkdir -p /models/demo
  cp -r "$demo/models/." /models/demo/
  echo "demo models in /models/demo: $(ls /models/demo | tr '\n' ' ')"
  exit 0
fi
for pair in $EVOMERGE_MODELS; do
  name=${pair%%=*}
  repo=${pair#*=}
  if [ "$name" = "$pair" ] || [ -z "$name" ] || [ -z "$repo" ]; then
    echo "EVOMERGE_MODELS: '$pair' is not name=org/repo" >&2
    exit 2
  fi
  HF_HUB_OFFLINE=0 huggingface-cli download "$repo" --local-dir "/models/$name" --exclude "*.bin" "*.pt" "*.pth"
done
ls -l /models
