#!/usr/bin/env bash
# Train the course's tiny models from scratch on a CPU and copy them into models/.
# Two runs at a time, one thread each (on 2 cores that is faster than one run on 2 threads).
#   bash scripts/train_course_models.sh            # everything: text encoder, VAE, six LDMs
#   bash scripts/train_course_models.sh ldm        # only the LDMs (models/course_vae must exist)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
PY=${PYTHON:-python}

if [ "${1:-all}" = all ]; then
  $PY scripts/make_course_text_encoder.py --out models/course_text_encoder
  $PY -m ldm_lib.train configs/shapes_vae.yaml logging.progress=false
  rm -rf models/course_vae && cp -r runs/shapes_vae/vae models/course_vae
  cp configs/shapes_vae.yaml models/course_vae/train_config.yaml
fi

train() {  # train one LDM config, then copy its model next to the others
  local name=$1
  $PY -m ldm_lib.train "configs/$name.yaml" logging.progress=false > "runs/$name.log" 2>&1
  $PY -m ldm_lib.training.export "runs/$name/model.safetensors" "models/$name.safetensors"  # EMA only
  echo "$name: $(tail -n 1 "runs/$name/metrics.jsonl")"
}
mkdir -p runs
for pair in "shapes_ldm_eps shapes_ldm_v" "shapes_ldm_eps_offset shapes_ldm_eps_minsnr" "shapes_ldm_v_ztsnr shapes_ldm_eps_ip"; do
  pids=()
  for name in $pair; do train "$name" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run stops the script (set -e)
done
$PY scripts/evaluate_course_models.py
