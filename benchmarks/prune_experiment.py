"""The "remove half the weights (and more)" experiment: iterative pruning of the digits MLP and of a
small CNN trained on digits, exact single-weight importance against magnitude, WANDA, Taylor and OBD.

    .venv/bin/python benchmarks/prune_experiment.py     # 3 seeds (~4 min on 2 cores): prints the tables,
                                                        # writes prune_experiment.png and .json beside it
    .venv/bin/python benchmarks/prune_experiment.py --seeds 1 --out /tmp/quick

Protocol, identical for every criterion:

* models: the digits MLP (64-256-256-10; pruned layers fc2 and fc3, those with a closed-form head,
  so that obd can score them too) and a small CNN (conv 1->16, pool, conv 16->32, fc1 512->128, fc2 128->10;
  pruned layers fc1 and fc2), each trained with the seed (split, init and order all follow it);
* one trajectory per (model, seed, criterion): prune to 50%, 80%, 90%, 95% of the pruned layers'
  weights (global ranking across the layers, ``weightablate.prune.global_unstructured``), each
  milestone a re-score on the pruned, fine-tuned model, then EPOCHS epochs of Adam fine-tuning
  with the masks held (same budget everywhere: EPOCHS per milestone);
* scores from the train split (never the test split); test loss and accuracy measured right after
  each pruning and after its fine-tuning.

One thread (torch.set_num_threads(1)): these models are tiny and more threads only contend.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from weightablate import prune as wp
from weightablate.digits import digits_model, load_digits_split
from weightablate.report_pruning import plot_pruning

MILESTONES = (0.5, 0.8, 0.9, 0.95)
EPOCHS = 2  # fine-tuning epochs after each pruning step
LR = 1e-3
# (label, criterion, ranking)
CRITERIA = (("exact", "exact", "signed"), ("exact (abs rank)", "exact", "abs"), ("magnitude", "magnitude", "signed"),
            ("wanda", "wanda", "signed"), ("taylor", "taylor", "signed"), ("obd", "obd", "signed"))
MODELS = {"mlp": ("fc2", "fc3"), "cnn": ("fc1", "fc2")}
CNN_EPOCHS = 8


def digits_cnn() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("unflatten", nn.Unflatten(1, (1, 8, 8))),
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("relu1", nn.ReLU()), ("pool", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(512, 128)), ("relu3", nn.ReLU()), ("fc2", nn.Linear(128, 10)),
    ]))


def base_model(kind: str, seed: int, X_tr, y_tr) -> nn.Module:
    if kind == "mlp":
        return digits_model(seed)  # trained once per seed and cached (5 epochs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = digits_cnn()
    return wp.finetune(model, (X_tr, y_tr), CNN_EPOCHS, lr=LR, seed=seed)


def run(seeds, epochs: int, log) -> list[dict]:
    records = []
    for kind, layers in MODELS.items():
        for seed in seeds:
            X_tr, y_tr, X_te, y_te = load_digits_split(seed)
            base = base_model(kind, seed, X_tr, y_tr)
            loss0, acc0 = wp.evaluate(base, (X_te, y_te))
            records.append({"model": kind, "seed": seed, "criterion": "dense", "target": 0.0, "sparsity": 0.0,
                            "loss": loss0, "accuracy": acc0, "loss_pruned": loss0, "accuracy_pruned": acc0})
            for label, criterion, ranking in CRITERIA:
                model = copy.deepcopy(base)
                started = time.perf_counter()
                hist = wp.iterative(model, list(layers), MILESTONES, (X_tr, y_tr), criterion=criterion,
                                    ranking=ranking, epochs=epochs, eval_data=(X_te, y_te), lr=LR, seed=seed)
                seconds = time.perf_counter() - started
                for h in hist:
                    records.append({"model": kind, "seed": seed, "criterion": label, **h})
                log(f"{kind} seed {seed} {label:10s} {seconds:5.1f} s  acc " +
                    " ".join(f"{h['accuracy_pruned']:.3f}->{h['accuracy']:.3f}" for h in hist))
    return records


def _cell(values, scale=1.0, digits=1):
    m = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def table(records, key: str, scale: float, digits: int) -> str:
    lines = []
    for kind in MODELS:
        dense = [r[key] for r in records if r["model"] == kind and r["criterion"] == "dense"]
        head = "| criterion | " + " | ".join(f"{int(100 * s)}%" for s in MILESTONES) + " |"
        lines += [f"**{kind}** ({', '.join(MODELS[kind])}; dense: {_cell(dense, scale, digits)})", "", head,
                  "|" + " --- |" * (len(MILESTONES) + 1)]
        for label, _, _ in CRITERIA:
            cells = []
            for s in MILESTONES:
                v = [r[key] for r in records if r["model"] == kind and r["criterion"] == label
                     and abs(r["target"] - s) < 1e-9]
                cells.append(_cell(v, scale, digits))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="fine-tuning epochs per milestone")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records = run(range(args.seeds), args.epochs, log)
    total = time.perf_counter() - started
    (args.out / "prune_experiment.json").write_text(json.dumps(records, indent=1) + "\n")
    plot_pruning(
        [r for r in records if r["criterion"] != "dense"], args.out / "prune_experiment.png",
        keys=("accuracy", "accuracy_pruned"),
        title=f"iterative pruning on digits, {args.epochs} fine-tuning epochs per step, "
              f"{args.seeds} seeds (mean, bars: sd)")
    report = ["Test accuracy (%) after fine-tuning, mean ± sd over seeds:", "", table(records, "accuracy", 100, 1),
              "Test loss (mean cross-entropy) after fine-tuning:", "", table(records, "loss", 1, 3),
              "Test accuracy (%) right after pruning, before that step's fine-tuning:", "",
              table(records, "accuracy_pruned", 100, 1), f"total {total:.0f} s"]
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
