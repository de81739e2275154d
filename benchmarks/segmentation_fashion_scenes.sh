#!/usr/bin/env bash
# Offline segmentation benchmark: NEPA-pretrained vs from-scratch micro backbone, same fine-tuning budget, on the
# built-in Fashion-MNIST scenes task (32x32 scenes of 1-2 items, 11 classes incl. background), CPU only.
#
#   bash benchmarks/segmentation_fashion_scenes.sh [OUT_DIR] [extra finetune_segmentation.py args...]
#
# Backbones (all nepa-vit-micro): (a) the demo's NEPA pretraining (200 steps on single bundled Fashion-MNIST items);
# (b) NEPA pretraining on the unlabelled training scenes (benchmarks/pretrain_nepa_on_scenes.py, 400 steps);
# (c) random init. Each is fine-tuned with identical arguments (COMMON below), end to end and, as a probe of the
# backbone features, with the backbone frozen (--freeze_backbone: only the neck and heads train).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/bench_seg}
shift || true
PYTHON=${PYTHON:-python}
# One intra-op thread: on a small shared CPU, two spinning OpenMP threads per process cost ~10x more CPU per step.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ ! -f outputs/demo/pretrained/model.safetensors ]; then
    "$PYTHON" examples/demo.py --output_dir outputs/demo
fi

COMMON=(
    --do_train --do_eval --use_cpu --report_to none --seed 0
    --num_train_scenes 2000 --num_eval_scenes 500 --scene_size 32 --scene_items 1 2 --scene_item_size 16 28
    --min_scale 0.75 --max_scale 1.5
    --config_overrides decode_hidden_size=32,auxiliary_hidden_size=32
    --max_steps 1200 --per_device_train_batch_size 8 --per_device_eval_batch_size 50
    --learning_rate 3e-3 --layer_decay 0.75 --weight_decay 0.05 --warmup_steps 60 --lr_scheduler_type cosine
    --logging_steps 100 --eval_strategy no --save_strategy no --final_eval_mode none --dataloader_num_workers 0
)
if [ ! -f "$OUT/pretrained-scenes/model.safetensors" ]; then
    "$PYTHON" benchmarks/pretrain_nepa_on_scenes.py --output_dir "$OUT/pretrained-scenes" --steps 400 --warmup_steps 40
fi
for MODE in finetune frozen; do
    EXTRA=(); PREFIX=""
    if [ "$MODE" = frozen ]; then EXTRA=(--freeze_backbone); PREFIX="frozen-"; fi
    "$PYTHON" examples/finetune_segmentation.py --model_name_or_path outputs/demo/pretrained \
        --output_dir "$OUT/${PREFIX}nepa" "${COMMON[@]}" "${EXTRA[@]}" "$@"
    "$PYTHON" examples/finetune_segmentation.py --model_name_or_path "$OUT/pretrained-scenes" \
        --output_dir "$OUT/${PREFIX}nepa-scenes" "${COMMON[@]}" "${EXTRA[@]}" "$@"
    "$PYTHON" examples/finetune_segmentation.py --config_preset nepa-vit-micro \
        --output_dir "$OUT/${PREFIX}scratch" "${COMMON[@]}" "${EXTRA[@]}" "$@"
done

"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for name in ("nepa", "nepa-scenes", "scratch", "frozen-nepa", "frozen-nepa-scenes", "frozen-scratch"):
    r = json.load(open(f"{out}/{name}/eval_results.json"))
    t = json.load(open(f"{out}/{name}/train_results.json"))
    print(f"{name:18s} mIoU {r['eval_mean_iou']:.4f}  pixel acc {r['eval_overall_accuracy']:.4f}  "
          f"mean acc {r['eval_mean_accuracy']:.4f}  train loss {t['train_loss']:.3f}  train time {t['train_runtime']:.0f}s")
PY
