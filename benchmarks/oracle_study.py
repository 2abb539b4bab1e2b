"""The oracle studies (issue 14): pruning criteria against the EXACT channel/weight effect, whether
the exact pruned loss predicts the result after fine-tuning, and half of MobileNetV3-Small pruned
through Torch-Pruning with the exact importance against Torch-Pruning's own.

    PYTHONPATH=. .venv/bin/python benchmarks/oracle_study.py          # full study (~15 min of CPU, one
                                                                     # thread): tables on stdout,
                                                                     # oracle_study.json/.png beside it
    PYTHONPATH=. .venv/bin/python benchmarks/oracle_study.py --tiny --out /tmp/o   # plumbing, seconds

Protocol (every number from the train split unless it says test; one thread):

* data: scikit-learn's digits upscaled bilinearly (weightablate.study.digits_images): 16x16x1 for
  the small CNN (conv 16-32-64, each Conv->BN->ReLU, max-pool, global average pooling, fc), 16x16x3
  for torchvision's MobileNetV3-Small (random init, BatchNorm momentum 0.1 instead of 0.01 so that
  the running statistics follow a few hundred steps). Both trained here with Adam.
* part 1, channel level: the exact effect of removing each output channel of every Conv2d that
  feeds a BatchNorm (``ablate(structure="out")``: filter, bias and BN channel; every consumer sees
  0) against the criteria of weightablate.study.CHANNEL_CRITERIA; Spearman and Kendall per layer and
  over all scored channels of the network. CNN: every channel, float64, the whole train split.
  MobileNet: ``mn_channels`` channels drawn per layer, on ``mn_samples`` train images (the exact
  replay of a MobileNet channel costs about one forward of the network per channel).
  Weight level (CNN): ``weight_k`` weights drawn per layer, exact single-weight delta against
  weightablate.criteria and, for the convs, OBD/taylor2 from the Gauss-Newton diagonal (which is the
  Hessian's diagonal here: the CNN's logits are piecewise linear in each layer's weights).
* part 2: ``masks`` random masks removing half the channels of ``mask_channels`` (and, separately,
  half of the weights of ``mask_weights``); per mask the exact pruned train loss (one float64 evaluation) and the test
  loss/accuracy after the same fine-tune (``ft_epochs`` of Adam, same seed, masks held). Kendall tau
  with a bootstrap interval; the single-unit oracle's additive prediction and its own mask.
* part 3: MobileNetV3-Small, ``p3_seeds`` seeds (the model is trained with the seed), 50% of the
  channels of every Torch-Pruning group (local ranking, the classifier's last Linear kept) by each
  importance, then ``p3_epochs`` of fine-tuning; test accuracy and loss before and after.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import weightablate as wa
from weightablate import criteria as wc
from weightablate import prune as wp
from weightablate import study as ws


@dataclasses.dataclass
class Config:
    image: int = 16
    train_n: int | None = None  # None: the whole train split (1,257 images)
    test_n: int | None = None
    cnn_epochs: int = 20
    mn_epochs: int = 10
    lr: float = 2e-3
    mn_channels: int = 12  # channels drawn per MobileNet layer (part 1)
    mn_samples: int = 256  # train images for MobileNet's oracle and criteria (part 1)
    weight_k: tuple = (("conv1", 64), ("conv2", 64), ("conv3", 2048), ("fc", 640))  # weights drawn per layer
    masks: int = 200
    mask_channels: str = "conv2"  # part 2: half of this layer's channels ...
    mask_weights: str = "conv3"  # ... and half of this layer's weights
    ft_epochs: int = 1
    n_boot: int = 1000
    p3_seeds: int = 3
    p3_samples: int = 32  # train images scoring the importances (part 3; the exact group replay costs
    #                       about one forward of the network per channel and image)
    p3_epochs: int = 3
    p3_ratio: float = 0.5
    p3_importances: tuple = ("exact", "magnitude", "taylor", "hessian", "bn_scale", "random")


TINY = Config(image=16, train_n=96, test_n=48, cnn_epochs=1, mn_epochs=1, mn_channels=2, mn_samples=16,
              weight_k=(("conv1", 8), ("conv2", 8), ("conv3", 24), ("fc", 24)),
              masks=6, ft_epochs=1, n_boot=50, p3_seeds=1, p3_samples=8, p3_epochs=1)


def load(cfg: Config, channels: int, seed: int = 0):
    X, y, Xt, yt = ws.digits_images(cfg.image, channels, seed)
    return X[:cfg.train_n], y[:cfg.train_n], Xt[:cfg.test_n], yt[:cfg.test_n]


def trained_cnn(cfg: Config, X, y, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ws.small_cnn()
    return wp.finetune(model, (X, y), cfg.cnn_epochs, lr=cfg.lr, batch_size=64, seed=seed)


def trained_mobilenet(cfg: Config, X, y, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ws.mobilenet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return wp.finetune(model, (X, y), cfg.mn_epochs, lr=cfg.lr, batch_size=64, seed=seed)


# --- part 1 -----------------------------------------------------------------------------------

def channel_table(model, X, y, units_per_layer, seed, precision, log) -> dict:
    """Exact channel effects and every channel criterion, correlated per layer and over the network."""
    pairs = ws.conv_bn_pairs(model)
    started = time.perf_counter()
    crit = ws.channel_criteria(model, pairs, X, y, seed=seed)
    crit_s = time.perf_counter() - started
    layers, truth, scores = [], [], {k: [] for k in ws.CHANNEL_CRITERIA}
    started = time.perf_counter()
    for conv, _ in pairs:
        n = model.get_submodule(conv).out_channels
        k = None if units_per_layer is None or units_per_layer >= n else units_per_layer
        structure = "out"
        try:
            res = wa.ablate(model, conv, (X, y), structure="out", weights=k, seed=seed, precision=precision,
                            progress=False, verify=False)
        except ValueError as exc:  # the channel meets a residual add: the branch's channel alone, named so
            if "structure='branch'" not in str(exc) and 'structure="branch"' not in str(exc):
                raise
            structure = "branch"
            res = wa.ablate(model, conv, (X, y), structure="branch", weights=k, seed=seed, precision=precision,
                            progress=False, verify=False)
        idx = res.indices
        corr = {c: ws.rank_correlations(crit[conv][c][idx], res.delta_loss) for c in crit[conv]}
        layers.append({"layer": conv, "channels": n, "scored": int(idx.numel()), "method": res.method,
                       "structure": structure, "indices": idx.tolist(),
                       "negative": float((res.delta_loss < 0).double().mean()), "correlations": corr})
        truth.append(res.delta_loss)
        for c in scores:
            scores[c].append(crit[conv][c][idx])
    oracle_s = time.perf_counter() - started
    truth = torch.cat(truth)
    whole = {c: ws.rank_correlations(torch.cat(v), truth) for c, v in scores.items()}
    log(f"  {len(pairs)} layers, {truth.numel()} channels: oracle {oracle_s:.0f} s, criteria {crit_s:.0f} s")
    return {"layers": layers, "network": whole, "oracle_s": oracle_s, "criteria_s": crit_s,
            "negative": float((truth < 0).double().mean()), "n": int(truth.numel()),
            "points": {"delta": truth.tolist(), **{c: torch.cat(v).tolist() for c, v in scores.items()}}}


WEIGHT_CRITERIA = ("magnitude", "wanda", "taylor", "obd", "taylor2", "random")


def weight_table(model, X, y, k, seed, log) -> list:
    """Exact single-weight deltas of k weights per layer against the weight-level criteria."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names = [f"{c}.weight" for c in convs]
    g = ws.loss_gradients(model, X, y, names)
    h = ws.ggn_diagonal(model, X, names)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        started = time.perf_counter()
        res = wa.ablate(model, name, (X, y), weights=min(k[name], m.weight.numel()), seed=seed, progress=False,
                        verify=False)  # float32 capture (the float64 replay of a conv weight costs ~0.5 s)
        idx = res.indices
        sc = {c: v.reshape(-1)[idx] for c, v in wc.compute(model, name, (X, y), ("magnitude", "wanda", "taylor",
                                                                                  "obd", "taylor2"),
                                                             strict=False).items()}
        if isinstance(m, nn.Conv2d):  # OBD / taylor2 from the Gauss-Newton diagonal (= Hessian's here)
            w = m.weight.detach().double().reshape(-1)[idx]
            hh, gg = h[f"{name}.weight"].reshape(-1)[idx], g[f"{name}.weight"].reshape(-1)[idx]
            sc["obd"], sc["taylor2"] = 0.5 * hh * w * w, -gg * w + 0.5 * hh * w * w
        sc["random"] = torch.rand(idx.numel(), generator=gen, dtype=torch.float64)
        rows.append({"layer": name, "weights": int(m.weight.numel()), "scored": int(idx.numel()),
                     "method": res.method, "negative": float((res.delta_loss < 0).double().mean()),
                     "seconds": time.perf_counter() - started,
                     "correlations": {c: ws.rank_correlations(sc[c], res.delta_loss) for c in WEIGHT_CRITERIA}})
    log(f"  weight level: {sum(r['scored'] for r in rows)} weights in {len(rows)} layers")
    return rows


def part1(cfg: Config, log) -> dict:
    out = {}
    X, y, Xt, yt = load(cfg, 1)
    cnn = trained_cnn(cfg, X, y)
    out["cnn"] = {"test": wp.evaluate(cnn, (Xt, yt)), "train": wp.evaluate(cnn, (X, y))}
    log(f"part 1: CNN test loss/acc {out['cnn']['test']}")
    out["cnn"]["channels"] = channel_table(cnn, X, y, None, 0, "float64", log)
    out["cnn"]["weights"] = weight_table(cnn, X, y, dict(cfg.weight_k), 0, log)
    X3, y3, Xt3, yt3 = load(cfg, 3)
    mn = trained_mobilenet(cfg, X3, y3)
    out["mobilenet"] = {"test": wp.evaluate(mn, (Xt3, yt3)), "train": wp.evaluate(mn, (X3, y3))}
    log(f"part 1: MobileNetV3-Small test loss/acc {out['mobilenet']['test']}")
    Xs, ys = X3[:cfg.mn_samples], y3[:cfg.mn_samples]
    out["mobilenet"]["channels"] = channel_table(mn, Xs, ys, cfg.mn_channels, 0, "model", log)
    return out, cnn, mn


# --- part 2 -----------------------------------------------------------------------------------

def _run_mask(base, apply, loss64, X, y, Xt, yt, cfg):
    model = apply(copy.deepcopy(base))
    rec = {"train_loss_pruned": loss64(model)}
    rec["test_loss_pruned"], rec["test_acc_pruned"] = wp.evaluate(model, (Xt, yt))
    wp.finetune(model, (X, y), cfg.ft_epochs, lr=cfg.lr, batch_size=64, seed=0)
    rec["test_loss"], rec["test_acc"] = wp.evaluate(model, (Xt, yt))
    rec["train_loss"] = wp.evaluate(model, (X, y))[0]
    return rec


def _masks_study(kind, base, n_units, single, apply_keep, loss64, X, y, Xt, yt, cfg, extra_rankings, log):
    """``masks`` random keep-masks of half of n_units; the single-unit oracle's additive prediction;
    the masks chosen by the single-unit ranking(s)."""
    gen = torch.Generator().manual_seed(1)
    n_drop = n_units // 2
    rows = []
    started = time.perf_counter()
    for i in range(cfg.masks):
        drop = torch.randperm(n_units, generator=gen)[:n_drop]
        keep = torch.ones(n_units, dtype=torch.bool)
        keep[drop] = False
        rec = _run_mask(base, lambda m: apply_keep(m, keep), loss64, X, y, Xt, yt, cfg)
        rec["additive"] = float(single[drop].sum())  # sum of the single-unit delta_loss of the removed units
        rows.append(rec)
    seconds = time.perf_counter() - started
    a = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    boot = lambda u, v: ws.kendall_bootstrap(u, v, cfg.n_boot)  # noqa: E731
    taus = {"pruned_train_loss~test_loss_after_ft": boot(a["train_loss_pruned"], a["test_loss"]),
            "pruned_train_loss~test_acc_after_ft": boot(a["train_loss_pruned"], a["test_acc"]),
            "pruned_train_loss~test_loss_pruned": boot(a["train_loss_pruned"], a["test_loss_pruned"]),
            "additive_oracle~pruned_train_loss": boot(a["additive"], a["train_loss_pruned"]),
            "additive_oracle~test_loss_after_ft": boot(a["additive"], a["test_loss"]),
            "train_loss_after_ft~test_loss_after_ft": boot(a["train_loss"], a["test_loss"])}
    chosen = {}
    for label, score in extra_rankings.items():  # drop the n_drop lowest-scored units
        keep = torch.ones(n_units, dtype=torch.bool)
        keep[torch.argsort(score)[:n_drop]] = False
        rec = _run_mask(base, lambda m: apply_keep(m, keep), loss64, X, y, Xt, yt, cfg)
        rec["additive"] = float(single[~keep].sum())
        for key in ("train_loss_pruned", "test_loss", "test_acc"):  # share of random masks it beats
            better = a[key] > rec[key] if key != "test_acc" else a[key] < rec[key]
            rec[f"beats_random_{key}"] = float(better.mean())
        chosen[label] = rec
    log(f"part 2 ({kind}): {cfg.masks} masks in {seconds:.0f} s; tau(pruned train loss, test loss after ft) "
        f"= {taus['pruned_train_loss~test_loss_after_ft']['tau']:.3f}")
    return {"masks": rows, "kendall": taus, "chosen": chosen, "seconds": seconds, "units": n_units,
            "dropped": n_drop}


def part2(cfg: Config, cnn, log) -> dict:
    X, y, Xt, yt = load(cfg, 1)
    conv, wl = cfg.mask_channels, cfg.mask_weights
    bn = dict(ws.conv_bn_pairs(cnn))[conv]
    layer, wlayer = cnn.get_submodule(conv), cnn.get_submodule(wl)
    single_ch = wa.ablate(cnn, conv, (X, y), structure="out", precision="float64", progress=False).delta_loss
    single_w = wa.ablate(cnn, wl, (X, y), precision="float64", progress=False).delta_loss
    l1 = layer.weight.detach().double().abs().flatten(1).sum(1)
    mag = wlayer.weight.detach().double().abs().reshape(-1)
    base = {"test": wp.evaluate(cnn, (Xt, yt)), "train_loss64": ws.float64_loss(cnn, X, y)}
    channels = _masks_study("channels", cnn, layer.out_channels, single_ch,
                            lambda m, keep: ws.mask_channels(m, conv, bn, keep), ws.Float64Suffix(cnn, conv, X, y),
                            X, y, Xt, yt, cfg,
                            {"single-channel oracle": single_ch, "l1 norm": l1}, log)
    weights = _masks_study("weights", cnn, wlayer.weight.numel(), single_w,
                           lambda m, keep: ws.mask_weights(m, wl, keep), ws.Float64Suffix(cnn, wl, X, y),
                           X, y, Xt, yt, cfg,
                           {"single-weight oracle (signed)": single_w, "single-weight oracle (|delta|)": single_w.abs(),
                            "magnitude": mag}, log)
    channels["layer"], weights["layer"] = conv, wl
    return {"base": base, "channels": channels, "weights": weights}


# --- part 3 -----------------------------------------------------------------------------------

def _importance(label, model, X, y):
    import torch_pruning as tp

    if label == "exact":
        return wp.ExactChannelImportance(model, (X, y))
    if label == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if label == "bn_scale":
        return tp.importance.BNScaleImportance()
    if label == "random":
        return tp.importance.RandomImportance()
    if label == "taylor":
        model.zero_grad()
        model.eval()
        F.cross_entropy(model(X), y).backward()
        return tp.importance.GroupTaylorImportance()
    if label == "hessian":
        imp = tp.importance.GroupHessianImportance()
        model.eval()
        losses = F.cross_entropy(model(X), y, reduction="none")
        imp.zero_grad()
        for loss in losses:
            model.zero_grad()
            loss.backward(retain_graph=True)
            imp.accumulate_grad(model)
        return imp
    raise ValueError(label)


def part3(cfg: Config, mn0, log) -> list:
    import torch_pruning as tp

    X, y, Xt, yt = load(cfg, 3)
    Xs, ys = X[:cfg.p3_samples], y[:cfg.p3_samples]
    rows = []
    for seed in range(cfg.p3_seeds):
        base = mn0 if seed == 0 else trained_mobilenet(cfg, X, y, seed)
        loss0, acc0 = wp.evaluate(base, (Xt, yt))
        rows.append({"seed": seed, "importance": "dense", "params": sum(p.numel() for p in base.parameters()),
                     "loss_pruned": loss0, "accuracy_pruned": acc0, "loss": loss0, "accuracy": acc0})
        for label in cfg.p3_importances:
            model = copy.deepcopy(base)
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # RandomImportance draws from the global generator
                imp = _importance(label, model, Xs, ys)
                pruner = tp.pruner.MetaPruner(model, Xs[:2], importance=imp, pruning_ratio=cfg.p3_ratio,
                                              ignored_layers=[model.classifier[-1]], global_pruning=False)
                pruner.step()
            model.zero_grad(set_to_none=True)
            score_s = time.perf_counter() - started
            loss_p, acc_p = wp.evaluate(model, (Xt, yt))
            wp.finetune(model, (X, y), cfg.p3_epochs, lr=cfg.lr, batch_size=64, seed=seed)
            loss, acc = wp.evaluate(model, (Xt, yt))
            rows.append({"seed": seed, "importance": label, "params": sum(p.numel() for p in model.parameters()),
                         "loss_pruned": loss_p, "accuracy_pruned": acc_p, "loss": loss, "accuracy": acc,
                         "score_s": score_s})
            log(f"part 3 seed {seed} {label:9s} acc {acc_p:.3f} -> {acc:.3f}  ({score_s:.0f} s to score and prune)")
    return rows


# --- tables and figure ------------------------------------------------------------------------

def _mean_sd(v, scale=1.0, digits=1):
    m = statistics.fmean(v) * scale
    sd = statistics.stdev(v) * scale if len(v) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def channel_markdown(tab, title) -> str:
    lines = [f"**{title}** ({tab['n']} channels, {100 * tab['negative']:.0f}% with delta_loss < 0)", "",
             "| criterion | Spearman | Kendall | Spearman \\|score\\| vs \\|delta\\| "
             "| per-layer Spearman: median (min..max) |",
             "| --- | ---: | ---: | ---: | --- |"]
    for c, r in tab["network"].items():
        per = [lay["correlations"][c]["spearman"] for lay in tab["layers"]]
        lines.append(f"| {c} | {r['spearman']:.3f} | {r['kendall']:.3f} | {r['spearman_abs']:.3f} | "
                     f"{statistics.median(per):.2f} ({min(per):.2f}..{max(per):.2f}) |")
    return "\n".join(lines) + "\n"


def per_layer_markdown(tab, criteria=("l1", "bn_gamma", "taylor_bn", "obd", "taylor_bn_signed")) -> str:
    lines = ["| layer | channels | method | % delta<0 | " + " | ".join(criteria) + " |",
             "| --- | ---: | --- | ---: |" + " ---: |" * len(criteria)]
    for lay in tab["layers"]:
        method = lay["method"] + (" (branch)" if lay.get("structure") == "branch" else "")
        lines.append(f"| {lay['layer']} | {lay['scored']}/{lay['channels']} | {method} | "
                     f"{100 * lay['negative']:.0f} | "
                     + " | ".join(f"{lay['correlations'][c]['spearman']:.2f}" for c in criteria) + " |")
    return "\n".join(lines) + "\n"


def weight_markdown(rows) -> str:
    lines = ["| layer | weights | method | % delta<0 | " + " | ".join(WEIGHT_CRITERIA) + " |",
             "| --- | ---: | --- | ---: |" + " ---: |" * len(WEIGHT_CRITERIA)]
    for r in rows:
        cells = [f"{r['correlations'][c]['spearman']:.3f} / {r['correlations'][c]['spearman_abs']:.2f}"
                 for c in WEIGHT_CRITERIA]
        lines.append(f"| {r['layer']} | {r['scored']}/{r['weights']} | {r['method']} | {100 * r['negative']:.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def masks_markdown(p2) -> str:
    lines = []
    for kind in ("channels", "weights"):
        s = p2[kind]
        lines += [f"**{s['dropped']} of {s['units']} {kind} of {s['layer']}, {len(s['masks'])} random masks**", "",
                  "| Kendall tau (95% bootstrap interval) | tau |", "| --- | --- |"]
        for k, v in s["kendall"].items():
            lines.append(f"| {k.replace('~', ' vs ')} | {v['tau']:.3f} ({v['low']:.3f}..{v['high']:.3f}) |")
        lines += ["", "| mask | pruned train loss | test acc after ft (%) | test loss after ft | beats random: "
                  "pruned loss / test loss / test acc |", "| --- | ---: | ---: | ---: | --- |"]
        tl = np.array([r["train_loss_pruned"] for r in s["masks"]])
        ta = np.array([r["test_acc"] for r in s["masks"]])
        te = np.array([r["test_loss"] for r in s["masks"]])
        lines.append(f"| random (median; min..max) | {np.median(tl):.3f} ({tl.min():.3f}..{tl.max():.3f}) | "
                     f"{100 * np.median(ta):.1f} ({100 * ta.min():.1f}..{100 * ta.max():.1f}) | "
                     f"{np.median(te):.3f} ({te.min():.3f}..{te.max():.3f}) | |")
        for label, r in s["chosen"].items():
            lines.append(f"| {label.replace('|', chr(92) + '|')} | {r['train_loss_pruned']:.3f} | "
                         f"{100 * r['test_acc']:.1f} | {r['test_loss']:.3f} | "
                         f"{100 * r['beats_random_train_loss_pruned']:.0f}% / "
                         f"{100 * r['beats_random_test_loss']:.0f}% / "
                         f"{100 * r['beats_random_test_acc']:.0f}% |")
        lines.append("")
    return "\n".join(lines)


def part3_markdown(rows) -> str:
    labels = list(dict.fromkeys(r["importance"] for r in rows))
    seeds = len({r["seed"] for r in rows})
    lines = [f"| importance ({seeds} seeds) | test acc pruned (%) | test acc after ft (%) | test loss pruned | "
             "test loss after ft | params |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for lab in labels:
        rs = [r for r in rows if r["importance"] == lab]
        lines.append(f"| {lab} | {_mean_sd([r['accuracy_pruned'] for r in rs], 100)} | "
                     f"{_mean_sd([r['accuracy'] for r in rs], 100)} | "
                     f"{_mean_sd([r['loss_pruned'] for r in rs], 1, 3)} | "
                     f"{_mean_sd([r['loss'] for r in rs], 1, 3)} | {rs[0]['params']:,} |")
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> None:
    from weightablate.figures import _figure

    fig, axes = _figure(13, 9, ncols=2, nrows=2)
    ax = axes[0]
    crits = list(ws.CHANNEL_CRITERIA)
    for i, (model, color) in enumerate((("cnn", "#1f77b4"), ("mobilenet", "#ff7f0e"))):
        vals = [result["part1"][model]["channels"]["network"][c]["spearman"] for c in crits]
        ax.barh(np.arange(len(crits)) + 0.4 * i, vals, 0.4, color=color, label=model)
    ax.set_yticks(np.arange(len(crits)) + 0.2, crits)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("Spearman with the exact channel delta_loss (whole network)")
    ax.legend()
    for ax, kind in zip(axes[1:3], ("channels", "weights")):
        s = result["part2"][kind]
        tl = [r["train_loss_pruned"] for r in s["masks"]]
        te = [r["test_loss"] for r in s["masks"]]
        ax.scatter(tl, te, s=8, alpha=0.6, label="random masks")
        for (label, r), mk in zip(s["chosen"].items(), "*^sD"):
            ax.scatter([r["train_loss_pruned"]], [r["test_loss"]], marker=mk, s=60, label=label)
        xs = tl + [r["train_loss_pruned"] for r in s["chosen"].values()]
        if max(xs) > 10 * min(xs):
            ax.set_xscale("log")
        tau = s["kendall"]["pruned_train_loss~test_loss_after_ft"]
        ax.set_title(f"50% of {s['layer']} {kind}: tau = {tau['tau']:.2f} "
                     f"({tau['low']:.2f}..{tau['high']:.2f})", fontsize=9)
        ax.set_xlabel("exact pruned train loss (float64)")
        ax.set_ylabel("test loss after the fine-tune")
        ax.legend(fontsize=7)
    ax = axes[3]
    rows = result["part3"]
    labels = [lab for lab in dict.fromkeys(r["importance"] for r in rows) if lab != "dense"]
    for j, (key, name) in enumerate((("accuracy_pruned", "pruned"), ("accuracy", "after fine-tune"))):
        m = [100 * statistics.fmean(r[key] for r in rows if r["importance"] == lab) for lab in labels]
        sd = [100 * statistics.pstdev([r[key] for r in rows if r["importance"] == lab]) for lab in labels]
        ax.barh(np.arange(len(labels)) + 0.4 * j, m, 0.4, xerr=sd, label=name)
    dense = [100 * r["accuracy"] for r in rows if r["importance"] == "dense"]
    ax.axvline(statistics.fmean(dense), color="k", ls="--", lw=0.8, label="dense")
    ax.set_yticks(np.arange(len(labels)) + 0.2, labels)
    ax.set_xlabel("MobileNetV3-Small, 50% channels: test accuracy (%)")
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=100)


def render(result: dict, out: Path | None) -> str:
    """The markdown tables of a result (and its figure into ``out`` when parts 2 and 3 are in it)."""
    if out is not None and "part2" in result and "part3" in result:
        plot(result, out / "oracle_study.png")
    p1 = result["part1"]
    report = [channel_markdown(p1["cnn"]["channels"],
                               f"CNN on digits 16x16 (test acc {100 * p1['cnn']['test'][1]:.1f}%)"),
              per_layer_markdown(p1["cnn"]["channels"]),
              channel_markdown(p1["mobilenet"]["channels"],
                               f"MobileNetV3-Small on digits 16x16 (test acc {100 * p1['mobilenet']['test'][1]:.1f}%)"),
              per_layer_markdown(p1["mobilenet"]["channels"]),
              "Weight level (CNN), Spearman with delta / Spearman of |score| with |delta|:", "",
              weight_markdown(p1["cnn"]["weights"])]
    if "part2" in result:
        report.append(masks_markdown(result["part2"]))
    if "part3" in result:
        report.append(part3_markdown(result["part3"]))
    report.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    return "\n".join(report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny configuration (plumbing only, seconds)")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (2 and 3 reuse part 1's models)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="print the tables of a saved oracle_study.json (and its figure into --out); runs nothing")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render is not None:
        try:
            result = json.loads(args.render.read_text())
            print(render(result, args.out))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"oracle_study: --render: {args.render} is not a readable oracle_study.json ({exc!r})",
                  file=sys.stderr)
            return 2
        return 0
    cfg = TINY if args.tiny else Config()
    parts = {int(p) for p in args.parts.split(",")}
    torch.set_num_threads(1)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    result = {"config": dataclasses.asdict(cfg), "seconds": {}}
    t = time.perf_counter()
    save = lambda: (args.out / "oracle_study.json").write_text(json.dumps(result, indent=1) + "\n")  # noqa: E731
    result["part1"], cnn, mn = part1(cfg, log)
    result["seconds"]["part1"] = time.perf_counter() - t
    save()  # after each part: a long run's finished parts are kept
    if 2 in parts:
        t = time.perf_counter()
        result["part2"] = part2(cfg, cnn, log)
        result["seconds"]["part2"] = time.perf_counter() - t
        save()
    if 3 in parts:
        t = time.perf_counter()
        result["part3"] = part3(cfg, mn, log)
        result["seconds"]["part3"] = time.perf_counter() - t
    result["seconds"]["total"] = time.perf_counter() - started
    save()
    print(render(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
