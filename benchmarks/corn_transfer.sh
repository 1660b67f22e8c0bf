#!/usr/bin/env bash
# Corn lab -> field transfer (issue #14, BENCHMARKS.md "Corn lab -> field: zero-shot, kNN, probe,
# few-shot"): trains CLIP + DINO + aligner with the main job on the lab photos, then measures on
# the field photos zero-shot (CLIP / AgriCLIP / ensemble), DINO's weighted kNN, the linear probe and
# 1/4/16-shot probe + class centroids for the clip, dino, agriclip (DINO -> aligner) and concat
# features (concat: CLIP and aligned DINO, each L2-normalised, side by side), every accuracy with
# its 95 % bootstrap interval. One feature cache serves all three. Logs go to stderr; stdout gets
# the markdown tables of BENCHMARKS.md.
#
# Usage (repo root or anywhere):
#   benchmarks/corn_transfer.sh [WORKDIR] [DATA]
#     WORKDIR  default /tmp/corn_run   (demo run in WORKDIR/demo, results in WORKDIR/*.json)
#     DATA     default ../shared/data/corn (needs lab/ and field/); relative paths are taken from
#              the repo root
# Environment: AGRICLIP (default .venv/bin/agriclip), PYTHON (default .venv/bin/python, prints
# the table), DEMO_CONFIG (default: the demo's own choice for --data, configs/demo.py:real),
# SKIP_DEMO=1 to reuse the models already in WORKDIR/demo/models.
# Wall time on the shared 2-core machine: 10-13 min (demo 573-718 s; zeroshot, knn, probe < 1 min).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORKDIR=${1:-/tmp/corn_run}
DATA=${2:-../shared/data/corn}
AGRICLIP=${AGRICLIP:-.venv/bin/agriclip}
DEMO=$WORKDIR/demo
M=$DEMO/models
CACHE=$WORKDIR/cache
mkdir -p "$WORKDIR"

t() {  # prints the command and its wall time; its output goes to stderr
  echo "+ $*" >&2
  local t0=$SECONDS
  "$@" >&2
  echo "  [$(( SECONDS - t0 )) s] $1 ${2:-}" >&2
}

if [[ "${SKIP_DEMO:-0}" != 1 ]]; then
  t "$AGRICLIP" demo --data "$DATA/lab" --metadata configs/corn_metadata.json \
      --eval "$DATA/field" --workdir "$DEMO" --no-export ${DEMO_CONFIG:+--config "$DEMO_CONFIG"}
fi

MODELS=(--model "$M/clip" --dino "$M/dino" --aligner "$M/aligner.safetensors")

# The demo's prompt phrase for corn ("a photo of a corn leaf with ..."), over the cleaned folder
# names (blight, common rust, gray leaf spot).
t "$AGRICLIP" zeroshot "${MODELS[@]}" --data "$DATA/field" \
    --template "a photo of a corn leaf with {}" --method all --cache "$CACHE" \
    --out "$WORKDIR/zs.json"

t "$AGRICLIP" knn "${MODELS[@]}" --train "$DATA/lab" --test "$DATA/field" \
    --features agriclip clip dino concat --cache "$CACHE" --out "$WORKDIR/knn.json"

t "$AGRICLIP" probe "${MODELS[@]}" --train "$DATA/lab" --test "$DATA/field" \
    --features agriclip clip dino concat --shots 1 4 16 --seeds 5 --cache "$CACHE" \
    --out "$WORKDIR/probe.json"

echo "results: $WORKDIR/zs.json $WORKDIR/knn.json $WORKDIR/probe.json" >&2

# The BENCHMARKS.md table from the three results files (markdown on stdout).
"${PYTHON:-.venv/bin/python}" - "$WORKDIR" <<'EOF'
import json, sys, os
W = sys.argv[1]
zs = json.load(open(os.path.join(W, "zs.json")))
knn = json.load(open(os.path.join(W, "knn.json")))
pr = json.load(open(os.path.join(W, "probe.json")))
def pct(x): return f"{100*x:.1f}"
def acc(iv): return f"{pct(iv['accuracy'])} [{pct(iv['low'])}, {pct(iv['high'])}]"
def diff(d): return f"{100*d['difference']:+.1f} [{100*d['low']:+.1f}, {100*d['high']:+.1f}]"
def part(doc, feat):
  return doc if doc["features"] == feat else doc["compared"][feat]
zsr = {r["method"]: r for r in zs["results"]}
first = knn["features"]
print(f"| features | zero-shot top-1 | kNN top-1 (k=20) | probe top-1 (C) | 1-shot probe / centroid | 4-shot probe / centroid | 16-shot probe / centroid |")
print("|---|---|---|---|---|---|---|")
for feat in knn["config"]["features"]:
  z = acc(zsr[feat]["top1_interval"]) if feat in zsr else "n/a (no text side)"
  k = part(knn, feat)["knn"]["20"]["top1_interval"]
  p = part(pr, feat)
  cells = [z, acc(k), f"{acc(p['probe']['top1_interval'])} (C {p['probe']['C']:.3g})"]
  for n in ("1", "4", "16"):
    f = p["fewshot"][n]
    cells.append(f"{pct(f['probe']['mean'])} ± {pct(f['probe']['std'])} / {pct(f['centroid']['mean'])} ± {pct(f['centroid']['std'])}")
  name = {"agriclip": "AgriCLIP (DINO -> aligner)", "clip": "CLIP", "dino": "DINO", "concat": "concat (CLIP ‖ AgriCLIP)"}[feat]
  print(f"| {name} | " + " | ".join(cells) + " |")
if "ensemble" in zsr:
  e = zsr["ensemble"]; w = e.get("ensemble", {}).get("weight")
  print(f"| ensemble (CLIP weight {w}) | {acc(e['top1_interval'])} | | | | | |")
print()
print(f"Paired differences, {first} minus each (top-1 points, 95 % paired bootstrap):")
print()
print("| vs | zero-shot | kNN k=20 | probe |")
print("|---|---|---|---|")
zd = {tuple(d["methods"]): d["top1"] for d in zs["differences"]}
for feat, c in knn["compared"].items():
  z = diff(zd[(first, feat)]) if (first, feat) in zd else "n/a"
  pd = pr["compared"][feat]["difference"]
  pd = pd["probe"]["top1"]
  print(f"| {feat} | {z} | {diff(c['difference']['20']['top1'])} | {diff(pd)} |")
print()
print("kNN top-1 at every k:", "; ".join(
  f"{feat} " + ", ".join(f"k={k} {pct(v['top1'])}" for k, v in part(knn, feat)["knn"].items())
  for feat in knn["config"]["features"]))
print(f"Images: train {knn['train']['images']} lab photos ({knn['train']['classes']} classes), "
      f"test {knn['test']['images']} field photos ({knn['test']['classes']} classes); zero-shot {zsr['clip']['num_images']} images, {zsr['clip']['num_classes']} classes.")
EOF
