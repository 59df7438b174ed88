"""Summarises bench/seed-experiment.sh output: accuracy of the Jetson-class nodes at rounds
25, 50 and 100, bytes sent per node per round, and where round time goes."""
import json
import os
import sys

out = sys.argv[1]
JETSONS = ["jetson-1", "jetson-2", "jetson-3", "jetson-4"]


def accuracy_at(rows, node, round_):
    evaluated = [r for r in rows if r["node"] == node and r["round"] <= round_
                 and r["test_accuracy"] is not None]
    return max(evaluated, key=lambda r: r["round"])["test_accuracy"] if evaluated else None


print(f"{'variant':<8} {'r25 mean/min':>14} {'r50 mean/min':>14} {'r100 mean/min':>14} "
      f"{'MB/node/round':>14} {'not training':>13} {'excl. eval':>11}")
for variant in ["fed", "quant", "topk", "solo"]:
    path = os.path.join(out, variant, "report.json")
    if not os.path.exists(path):
        continue
    rows = [r for r in json.load(open(path))["rounds"] if r["node"] in JETSONS]
    cells = []
    for round_ in (25, 50, 100):
        accs = [accuracy_at(rows, n, round_) for n in JETSONS]
        accs = [a for a in accs if a is not None]
        cells.append(f"{100 * sum(accs) / len(accs):5.1f}/{100 * min(accs):5.1f}"
                     if accs else "-")
    mb = sum(r["bytes_sent"] for r in rows) / len(rows) / 1e6
    total = sum(r["round_seconds"] for r in rows)
    training = sum(r["training_seconds"] for r in rows)
    evaluation = sum(r.get("evaluation_seconds", 0.0) for r in rows)
    outside = 1 - training / total
    outside_excl_eval = (total - training - evaluation) / total
    print(f"{variant:<8} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} {mb:>14.3f} "
          f"{100 * outside:>12.1f}% {100 * outside_excl_eval:>10.1f}%")

central = os.path.join(out, "central", "train.json")
if os.path.exists(central):
    report = json.load(open(central))
    # 80 rounds of 100 steps of 128; federated round r covers r * 20 steps * 4 nodes * 128
    # samples, which is central round 0.8 r: rounds 25, 50, 100 match 20, 40, 80.
    accs = {r["round"]: r["test_accuracy"] for r in report["rounds"] if r["test_accuracy"]}
    cells = [f"{100 * accs[r]:5.1f}" if r in accs else "-" for r in (20, 40, 80)]
    print(f"{'central':<8} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}   (same samples "
          f"as federated rounds 25, 50, 100)")
