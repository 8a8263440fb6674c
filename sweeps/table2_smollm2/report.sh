#!/usr/bin/env bash
# The Table 2 study's report, from the committed records and study database only (no torch, no model):
#   bash sweeps/table2_smollm2/report.sh        -> reports/table2_smollm2/report.{md,html,json}, figures/
# Runs still missing are listed in the report as such.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=reports/table2_smollm2
DB=sqlite:///$OUT/table2_smollm2.db
runs=("paper settings=$OUT/runs/base" "paper settings=$OUT/runs/table2-smollm2-main"
      "paper settings=$OUT/runs/table2-smollm2-cloze")
studies=()
for method in mixlora lora dora; do
  runs+=("tuned on dev=$OUT/runs/table2-smollm2-tuned-$method")
  studies+=("$DB:table2-smollm2-tune-$method")
done
runs+=("tuned on dev=$OUT/runs/base/paper")
studies+=("$DB:table2-smollm2-shape")
existing=()
for s in "${studies[@]}"; do  # studies not started yet are left out (the report lists what ran)
  .venv/bin/python -c "import optuna,sys; optuna.logging.set_verbosity(0); optuna.load_study(study_name=sys.argv[2], storage=sys.argv[1])" \
      "${s%:*}" "${s##*:}" 2>/dev/null && existing+=("$s")
done
.venv/bin/mixlora-lit report --title "Does MixLoRA's multi-task gain hold? Table 2 on SmolLM2-135M" \
    --runs "${runs[@]}" ${existing:+--study "${existing[@]}"} --out $OUT
