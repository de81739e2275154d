#!/usr/bin/env bash
# Offline segmentation benchmark: NEPA-pretrained vs from-scratch micro backbone, same fine-tuning budget, on the
# built-in Fashion-MNIST scenes task (32x32 scenes of 1-2 items, 11 classes incl. background), CPU only.
#
#   bash benchmarks/segmentation_fashion_scenes.sh [OUT_DIR] [extra finetune_segmentation.py args...]
#   BACKBONES="study demo scenes scratch" MODES="finetune frozen" bash benchmarks/segmentation_fashion_scenes.sh
#
# Backbones (nepa-vit-micro widths), chosen with BACKBONES (default "study scratch"):
#   study   - the NEPA backbone of the Fashion-MNIST study (patch 7 at 28x28, 8 epochs of the 60k training images;
#             `python benchmarks/fashion_mnist_study.py --units pretrain-nepa-s0` makes it: benchmarks/results/fashion_mnist_study/pretrain-nepa-s0/model);
#   demo    - the demo's NEPA pretraining (outputs/demo/pretrained, made by examples/demo.py when missing);
#   scenes  - NEPA on the unlabelled training scenes (benchmarks/pretrain_nepa_on_scenes.py, 400 steps);
#   scratch - random init.
# Each is fine-tuned with identical arguments (COMMON below); MODES adds "frozen" (--freeze_backbone: only the
# neck and heads train, a probe of the backbone's features).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/bench_seg}
shift || true
PYTHON=${PYTHON:-python}
BACKBONES=${BACKBONES:-study scratch}
MODES=${MODES:-finetune}
# One intra-op thread: on a small shared CPU, two spinning OpenMP threads per process cost ~10x more CPU per step.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

COMMON=(
    --do_train --do_eval --use_cpu --report_to none --seed 0
    --num_train_scenes 2000 --num_eval_scenes 500 --scene_size 32 --scene_items 1 2 --scene_item_size 16 28
    --min_scale 0.75 --max_scale 1.5
    --config_overrides decode_hidden_size=32,auxiliary_hidden_size=32
    --max_steps 1200 --per_device_train_batch_size 8 --per_device_eval_batch_size 50
    --learning_rate 3e-3 --layer_decay 0.75 --weight_decay 0.05 --warmup_steps 60 --lr_scheduler_type cosine
    --logging_steps 100 --eval_strategy no --save_strategy no --final_eval_mode none --dataloader_num_workers 0
)

backbone_args() {
    case "$1" in
        study)
            if [ ! -f benchmarks/results/fashion_mnist_study/pretrain-nepa-s0/model/model.safetensors ]; then
                echo "missing benchmarks/results/fashion_mnist_study/pretrain-nepa-s0/model: run python benchmarks/fashion_mnist_study.py --units pretrain-nepa-s0" >&2
                exit 1
            fi
            echo --model_name_or_path benchmarks/results/fashion_mnist_study/pretrain-nepa-s0/model ;;
        demo)
            [ -f outputs/demo/pretrained/model.safetensors ] || "$PYTHON" examples/demo.py --output_dir outputs/demo >&2
            echo --model_name_or_path outputs/demo/pretrained ;;
        scenes)
            [ -f "$OUT/pretrained-scenes/model.safetensors" ] || "$PYTHON" benchmarks/pretrain_nepa_on_scenes.py \
                --output_dir "$OUT/pretrained-scenes" --steps 400 --warmup_steps 40 >&2
            echo --model_name_or_path "$OUT/pretrained-scenes" ;;
        scratch)
            echo --config_preset nepa-vit-micro ;;
        *) echo "unknown backbone $1 (study, demo, scenes, scratch)" >&2; exit 1 ;;
    esac
}

RUNS=()
for MODE in $MODES; do
    EXTRA=(); PREFIX=""
    if [ "$MODE" = frozen ]; then EXTRA=(--freeze_backbone); PREFIX="frozen-"; fi
    for BACKBONE in $BACKBONES; do
        read -r -a INIT <<< "$(backbone_args "$BACKBONE")"
        "$PYTHON" examples/finetune_segmentation.py "${INIT[@]}" --output_dir "$OUT/${PREFIX}${BACKBONE}" \
            "${COMMON[@]}" "${EXTRA[@]}" "$@"
        RUNS+=("${PREFIX}${BACKBONE}")
    done
done

"$PYTHON" - "$OUT" "${RUNS[@]}" <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
for name in names:
    r = json.load(open(f"{out}/{name}/eval_results.json"))
    t = json.load(open(f"{out}/{name}/train_results.json"))
    print(f"{name:18s} mIoU {r['eval_mean_iou']:.4f}  pixel acc {r['eval_overall_accuracy']:.4f}  "
          f"mean acc {r['eval_mean_accuracy']:.4f}  train loss {t['train_loss']:.3f}  train time {t['train_runtime']:.0f}s")
PY
