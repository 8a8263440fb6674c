#!/usr/bin/env bash
# The Table 2 study on SmolLM2-135M (issue 17), start to end: `make study` (or this script).
# Resumable: run it again after any interruption. Finished runs are never re-run; the run in progress
# continues from its last checkpoint. Every finished run's compact record and the study database are
# copied under reports/table2_smollm2/ and committed as they finish (COMMIT= turns committing off).
# A SIGTERM to this script's process group (kill -- -PGID) stops it cleanly: the running fit checkpoints.
set -euo pipefail
cd "$(dirname "$0")/../.."
ML=.venv/bin/mixlora-lit
PY=.venv/bin/python
COMMIT=${COMMIT---commit}
OUT=reports/table2_smollm2
STUDY_FIT=configs/studies/table2_smollm2.yaml
SWEEPS=sweeps/table2_smollm2

finished() { [ -f "$1/run.json" ] && grep -q '"status": "finished"' "$1/run.json"; }

echo "== 1. the base model, zero-shot (one test pass per protocol, the same 500 examples per task)"
for protocol in paper cloze; do
  dest=$OUT/runs/base/$protocol
  if finished "$dest"; then echo "base $protocol: done"; continue; fi
  root=runs/studies/table2_smollm2/base/$protocol
  cutoff=512; [ $protocol = cloze ] && cutoff=1024  # as main.yaml and cloze.yaml
  rm -rf "$root"
  $ML test --config $STUDY_FIT --model.adapter.method=base --data.protocol=$protocol --data.test_cap=500 \
      --data.cutoff_len=$cutoff --trainer.default_root_dir=$root --run_name=table2-smollm2-base/$protocol
  $PY -m mixlora_lit.sweep.archive "$root/version_0" "$dest" $COMMIT
done

echo "== 2. the comparison with the paper's settings: seed x method, paper protocol, then cloze (items 1 and 2)"
$ML sweep run --config $SWEEPS/main.yaml $COMMIT
$ML sweep run --config $SWEEPS/cloze.yaml $COMMIT

echo "== 3. equal-budget tuning on dev, then each method's best configuration with the same 3 seeds (item 3)"
for method in mixlora lora dora; do
  $ML sweep run --config $SWEEPS/tune_$method.yaml $COMMIT
done
for method in mixlora lora dora; do
  best=$OUT/best/$method.yaml
  [ -f "$best" ] || $ML sweep best --config $SWEEPS/tune_$method.yaml --out "$best"
  $ML sweep run --config $SWEEPS/tuned.yaml --fit-config "$best" --study-name table2-smollm2-tuned-$method $COMMIT
done

echo "== 4. what drives the result: MixLoRA's expert count x top-k at its tuned settings (item 4)"
$ML sweep run --config $SWEEPS/shape.yaml --fit-config $OUT/best/mixlora.yaml $COMMIT

echo "== the report"
bash $SWEEPS/report.sh
if [ -n "$COMMIT" ]; then
  git add -- $OUT && git commit -q -m "table2_smollm2: the study's report, regenerated" -- $OUT || true
fi
