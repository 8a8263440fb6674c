#!/usr/bin/env bash
# The Table 2 study on SmolLM2-135M (issue 17), start to end: `make study` (or this script).
# Resumable: run it again after any interruption. Finished runs are never re-run; the run in progress
# continues from its last checkpoint. Every finished run's compact record and the study database are
# copied under reports/table2_smollm2/ and committed as they finish (COMMIT= turns committing off).
# A SIGTERM (kill PID) stops it cleanly: the running fit checkpoints first.
set -euo pipefail
cd "$(dirname "$0")/../.."
ML=.venv/bin/mixlora-lit
PY=.venv/bin/python
COMMIT=${COMMIT---commit}
OUT=reports/table2_smollm2
STUDY_FIT=configs/studies/table2_smollm2.yaml

finished() { [ -f "$1/run.json" ] && grep -q '"status": "finished"' "$1/run.json"; }

echo "== 1. the base model, zero-shot (one test pass per protocol, the same 500 examples per task)"
for protocol in paper cloze; do
  dest=$OUT/runs/base/$protocol
  if finished "$dest"; then echo "base $protocol: done"; continue; fi
  root=runs/studies/table2_smollm2/base/$protocol
  rm -rf "$root"
  $ML test --config $STUDY_FIT --model.adapter.method=base --data.protocol=$protocol --data.test_cap=500 \
      --trainer.default_root_dir=$root --run_name=table2-smollm2-base/$protocol
  $PY -m mixlora_lit.sweep.archive "$root/version_0" "$dest" $COMMIT
done

echo "== 2. the comparison: protocol x seed x method, the paper's settings (items 1 and 2)"
$ML sweep run --config sweeps/table2_smollm2/main.yaml $COMMIT
