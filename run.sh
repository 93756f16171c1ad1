#!/usr/bin/env bash
# The main job: pretrain -> extend -> evaluate (experiment.py; arguments go to train.py). Sets up .venv from
# requirements.txt on first use, e.g.  ./run.sh  |  ./run.sh --qk_norm headwise --gqa 4
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
exec .venv/bin/python experiment.py "$@"
