#!/usr/bin/env bash
# experiments/rerun.sh -- retrain and re-evaluate the paper's experiment of RESULTS.md on one
# dataset, in the order the evaluations need: the grid ViT, its retrofit (retrofitting), SPoT from
# scratch; SPoT-ON's lr sweep on validation images; oracle.py's table for each (SPoT-ON, transfer
# from the retrofit, finding 3); the learned placer; the label-free evaluation against SPoT's
# table; then each model's weights and card beside its results (experiments/models.py: export,
# check). This is how the committed results/ are remade; every command is the one RESULTS.md
# prints, with the recipe pinned (fp32 and the preset's seven training priors, as the first runs
# had them).
#
#     bash experiments/rerun.sh cifar10 ../data/cifar10            # about 2.5 hours on 2 CPU cores
#     bash experiments/rerun.sh cifar10 ../data/cifar10 seed1      # the second training seeds
#     bash experiments/rerun.sh imagenette ../data/imagenette-128
#     bash experiments/rerun.sh shapes -                            # the default run (minutes)
#
# Run it from the repository root. Each step logs to runs/rerun-DATASET/NAME.log and is skipped
# when it has finished (a training run with its final test line, the sweep with its sweep.json,
# an evaluation with its per_image.npz, written last), so a second call continues where the first
# stopped.
set -euo pipefail
usage="usage: bash experiments/rerun.sh cifar10|imagenette|shapes DATA_DIR [seed1]"
dataset=${1:?$usage}
data_dir=${2:?$usage}
stage=${3:-main}     # seed1: CIFAR-10's second seeds (RESULTS.md: "A second training seed") only
if [[ $stage != main && ! ( $stage == seed1 && $dataset == cifar10 ) ]]; then
  echo "rerun.sh: the third argument can only be seed1, with cifar10; got '$stage'" >&2; exit 2
fi
logs=runs/rerun-$dataset
mkdir -p "$logs"
pin=(--precision fp32 --train-priors uniform,gaussian,sobol,isotropic,center,salient,grid --threads 2 --no-progress)

case $dataset in
  cifar10)
    common=(--dataset cifar10 --data-dir "$data_dir" --preset cifar10-cpu --eval-tokens 4,8,16)
    grid=(--tokens all --epochs 6 --warmup-epochs 1 --lr 5e-4 --eval-prior isotropic)
    retrofit=(--epochs 3 --warmup-epochs 0.2)
    search_lr=0.03 sweep_limit=500 placer=c10-placer-lr1e-3 ;;
  imagenette)
    common=(--dataset folder --data-dir "$data_dir" --preset imagenette-cpu --eval-tokens 4,8,16)
    grid=(--tokens all --epochs 24)
    retrofit=(--epochs 8 --warmup-epochs 0.5)
    search_lr=0.03 sweep_limit=300 placer=in-placer-lr1e-3 ;;
  shapes) ;;    # the default run: README's `python train.py`, built-in data (DATA_DIR unused)
  *) echo "rerun.sh: the dataset must be cifar10, imagenette or shapes, got '$dataset'" >&2
     exit 2 ;;
esac

step() {  # step NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists, its log in $logs/NAME.log
  local name=$1 output=$2; shift 2
  if [[ -e $output ]]; then echo "skip $name: $output exists"; return; fi
  echo "$(date +%H:%M:%S) $name: $*"
  "$@" > "$logs/$name.log" 2>&1
}

train() {  # train RUN FLAGS...: train.py into runs/RUN (an interrupted run is resumed), then its
           # run.json and metrics.jsonl into results/RUN
  local run=$1; shift
  if grep -qs '"final": true' "runs/$run/metrics.jsonl"; then
    echo "skip train-$run: finished"
  elif [[ -e runs/$run/checkpoint.pt ]]; then
    step "train-$run" "runs/$run/never" python train.py --resume --out "runs/$run"
  else
    step "train-$run" "runs/$run/never" python train.py "${common[@]}" "${pin[@]}" "$@" --out "runs/$run"
  fi
  mkdir -p "results/$run" && cp "runs/$run/run.json" "runs/$run/metrics.jsonl" "results/$run/"
}

evaluate=(python oracle.py --draws 2 --batch-size 512 --threads 1 --no-progress)
if [[ $dataset == shapes ]]; then     # as it is, not pinned: the README's command, then its table
  if ! grep -qs '"final": true' runs/shapes-default/metrics.jsonl; then
    rm -rf runs/shapes-default
    step "train-shapes-default" "runs/shapes-default/never" \
      python train.py --threads 2 --no-progress --out runs/shapes-default
  fi
  mkdir -p results/shapes-default
  cp runs/shapes-default/run.json runs/shapes-default/metrics.jsonl results/shapes-default/
  step "oracle-shapes-default" "results/shapes-default/per_image.npz" python oracle.py \
    --checkpoint runs/shapes-default/checkpoint.pt --name shapes-default --draws 2 \
    --search-limit 1000 --saliency-limit 1000 --threads 1 --no-progress --out results/shapes-default
elif [[ $stage == seed1 ]]; then    # the same recipes with --seed 1 (initialization, data order,
                                  # augmentation, training positions; the same validation images)
  train cifar10-grid-vit-seed1 "${grid[@]}" --train-priors grid --seed 1
  train cifar10-spot-seed1 --seed 1
  step "oracle-spot-seed1" "results/cifar10-spot-seed1/per_image.npz" "${evaluate[@]}" \
    --checkpoint runs/cifar10-spot-seed1/checkpoint.pt --name cifar10-spot-seed1 --search-steps 20 \
    --search-lr "$search_lr" --search-limit 2000 --saliency-limit 2000 --out results/cifar10-spot-seed1 &
  step "oracle-grid-vit-seed1" "results/cifar10-grid-vit-seed1/per_image.npz" "${evaluate[@]}" \
    --checkpoint runs/cifar10-grid-vit-seed1/checkpoint.pt --name cifar10-grid-vit-seed1 \
    --search-limit 0 --out results/cifar10-grid-vit-seed1
  wait
else   # the main stage (not indented, to read as before)
# (the grid ViT trains on the grid prior only: its --train-priors grid comes after the pinned list)
train "$dataset-grid-vit" "${grid[@]}" --train-priors grid
train "$dataset-retrofit" "${retrofit[@]}" --init-from "runs/$dataset-grid-vit/checkpoint.pt"
train "$dataset-spot"

# SPoT-ON's (steps, lr) sweep on validation images: the record behind $search_lr (RESULTS.md reads it)
step "oracle-sweep" "results/$dataset-spot-oracle-sweep/sweep.json" python -m experiments.bench --only oracle-sweep \
  --checkpoint "runs/$dataset-spot/checkpoint.pt" --limit "$sweep_limit" --tokens 4,16 --threads 1 \
  --out "results/$dataset-spot-oracle-sweep"
step "oracle-spot" "results/$dataset-spot/per_image.npz" "${evaluate[@]}" \
  --checkpoint "runs/$dataset-spot/checkpoint.pt" --name "$dataset-spot" \
  --transfer-checkpoint "runs/$dataset-retrofit/checkpoint.pt" --search-steps 20 --search-lr "$search_lr" \
  --search-limit 2000 --saliency-limit 2000 --out "results/$dataset-spot" &
step "oracle-grid-vit" "results/$dataset-grid-vit/per_image.npz" "${evaluate[@]}" \
  --checkpoint "runs/$dataset-grid-vit/checkpoint.pt" --name "$dataset-grid-vit" --search-limit 0 \
  --out "results/$dataset-grid-vit"
step "oracle-retrofit" "results/$dataset-retrofit/per_image.npz" "${evaluate[@]}" \
  --checkpoint "runs/$dataset-retrofit/checkpoint.pt" --name "$dataset-retrofit" --search-limit 0 \
  --out "results/$dataset-retrofit"
[[ -e runs/$placer/placer.pt ]] || rm -rf "runs/$placer"       # placement.py never writes into a used folder
step "placer" "runs/$placer/placer.pt" python -m experiments.placement \
  --checkpoint "runs/$dataset-spot/checkpoint.pt" --tokens 8,16 --epochs 4 --lr 1e-3 --threads 1 --out "runs/$placer"
mkdir -p "results/$dataset-placer" && cp "runs/$placer/run.json" "runs/$placer/metrics.jsonl" "results/$dataset-placer/"
wait    # SPoT's table: the label-free evaluation compares against it
step "label-free" "results/$dataset-label-free/per_image.npz" python -m experiments.label_free evaluate \
  --checkpoint "runs/$dataset-spot/checkpoint.pt" --placer "runs/$placer/placer.pt" --name "$dataset-spot" \
  --against "results/$dataset-spot" --tokens 4,8,16 --search-lr 0.03 --draws 2 --threads 2 --no-progress \
  --out "results/$dataset-label-free"
fi     # the end of the main stage
python -m experiments.tables
echo "$(date +%H:%M:%S) results/ and RESULTS.md's tables are remade"

# The trained models beside their results (experiments/models.py): each finished run's weights
# and card (results/NAME/model.pt or placer.pt, and MODEL.md), then the check that they
# reproduce the committed per-image results on 200 test images. An export is skipped when it is
# newer than the run's weights; CIFAR-10's second seeds are exported when their runs are here.
export_model() {  # export_model RUN RESULTS: runs/RUN -> results/RESULTS
  local weights=runs/$1/checkpoint.pt file=results/$2/model.pt
  if [[ -e runs/$1/placer.pt ]]; then weights=runs/$1/placer.pt file=results/$2/placer.pt; fi
  if [[ -e $file && $file -nt $weights ]]; then echo "skip export-$2: $file is newer"; return; fi
  step "export-$2" "$file.never" \
    python -m experiments.models export --run "runs/$1" --to "results/$2"
}
if [[ $dataset == shapes ]]; then
  export_model shapes-default shapes-default
  echo "$(date +%H:%M:%S) check-models: the default run's model against its per-image results"
  python -m experiments.models check shapes-default --limit 200 | tee "$logs/check-models.log"
  exit
fi
if [[ $stage == main ]]; then
  for run in "$dataset"-{grid-vit,retrofit,spot}; do export_model "$run" "$run"; done
  export_model "$placer" "$dataset-placer"
fi
for run in "$dataset-grid-vit-seed1" "$dataset-spot-seed1"; do
  if grep -qs '"final": true' "runs/$run/metrics.jsonl"; then export_model "$run" "$run"; fi
done
data_flag=--data-dir-folder
if [[ $dataset == cifar10 ]]; then data_flag=--data-dir-cifar10; fi
checked=("$dataset"-{grid-vit,retrofit,spot,placer} "$dataset"-{grid-vit,spot}-seed1)
echo "$(date +%H:%M:%S) check-models: the exported models against their per-image results"
python -m experiments.models check "${checked[@]}" "$data_flag" "$data_dir" --limit 200 \
  | tee "$logs/check-models.log"
echo "$(date +%H:%M:%S) done: the models (model.pt, placer.pt, MODEL.md) are exported and checked"
