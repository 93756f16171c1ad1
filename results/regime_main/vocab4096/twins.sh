#!/bin/bash
# twins.sh S: the all-global twin of runs/v4096-sS's pretrained model (the same weights, "window": null,
# one function at L = 128), extended as the default extends (420 steps of 2 x 1,024, the recipe and the
# control; lr 3.006e-4, the default's own: the source's final lr x 2.9952/3, given here because the twin
# folder carries no train state), then probed at L..8L beside held-out loss and LongPPL.
set -e
cd "$(dirname "$0")/../../.."
S=$1; SOURCE=runs/v4096-s$S/pretrain/step_0012000; OUT=runs/v4096-s$S-twin
mkdir -p $OUT/model
cp $SOURCE/compact_vocab.json $SOURCE/model.safetensors $OUT/model/
python3 -c "import json; c = json.load(open('$SOURCE/config.json')); c['window'] = None; json.dump(c, open('$OUT/model/config.json', 'w'), indent=1)"
for recipe in olmpool none; do
  factor=""; [ $recipe = olmpool ] && factor="--rope_factor 16.0"
  .venv/bin/python extend.py --from $OUT/model --recipe $recipe --seq_len 1024 --steps 420 --out $OUT/extend-$recipe $factor \
      --data data/builtin_v4096_retrieval_long_1024 --seed $S --threads 1 --lr 0.000300643
done
OMP_NUM_THREADS=1 .venv/bin/python evaluate.py $OUT/model $OUT/extend-olmpool $OUT/extend-none \
    --labels "pretrained,extended,none control" --modes probes,longppl --lengths 128,1024 \
    --data data/builtin_v4096_retrieval_L128 --probe_lengths 128,256,512,1024 --probe_count 32 --out $OUT/eval
