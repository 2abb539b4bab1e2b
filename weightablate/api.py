"""weightablate.ablate: the one entry point."""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from . import ops
from .closed_form import ClosedForm
from .data import batches
from .memory import check_max_memory
from .naive import naive_ablate
from .result import AblationResult
from .selection import select_weights
from .sweep import sweep

METRICS = ("loss", "kl", "flips")
MODES = ("auto", "exact")
PRECISIONS = ("model", "float64")


def _resolve_layer(model: nn.Module, layer) -> tuple[str, nn.Module]:
    if isinstance(layer, str):
        try:
            return layer, model.get_submodule(layer)
        except AttributeError:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(f"layer {layer!r} is not a module of the model; its Linear layers are: {names}") from None
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ValueError("layer: the module given is not part of the model")
    raise TypeError(f"layer must be a dotted module name or an nn.Module, got {type(layer).__name__}")


def _check_model(model: nn.Module, device) -> torch.device:
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) > 1:
        raise ValueError(f"model: parameters and buffers live on several devices {sorted(map(str, devices))}")
    model_device = devices.pop() if devices else torch.device("cpu")
    if device is not None:
        device = torch.device(device)
        if device.type != model_device.type or (
                device.type != "cpu" and device.index is not None and device.index != (model_device.index or 0)):
            raise ValueError(f"device={str(device)!r} but the model is on {model_device}: move the model first "
                             "(model.to(device)); inputs are moved to the model's device for you")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        # the sum is finite when every element is (one cheap pass); it can also overflow: then look closer
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise ValueError(f"model: {name} contains NaN or inf")
    return model_device


def _check_options(metrics, mode, seed):
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {metrics!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return metrics


def ablate(model: nn.Module, layer, data, weights=None, *, metrics=METRICS, backend: str = "auto",
           mode: str = "auto", precision: str = "model", device=None, batch_size: int | None = None,
           seed: int = 0, by_class: bool = False, max_memory: int | None = None,
           progress: bool | None = None) -> AblationResult:
    """The exact effect of zeroing each chosen weight of ``layer``, alone, over all of ``data``.

    For each weight ``W[i, j]`` and sample ``n`` the change of unit ``i`` is one scalar
    ``d_n = s(z_ni - W_ij a_nj) - s(z_ni)`` and the logits move by ``d_n * V[:, i]`` (DESIGN.md);
    the loss and KL changes are computed from that rank-one correction without ever subtracting
    two losses, and summed over samples in float64.

    Args:
        model: a classifier whose forward returns logits (N, C). Used in eval mode; its modes are
            restored and its weights are never changed (bit-identical after the call).
        layer: dotted name (``"classifier.4"``) or the ``nn.Linear`` module itself.
        data: a DataLoader, any iterable of ``(inputs, labels)`` batches, or a tuple ``(X, y)``.
        weights: None (every weight), an int K (K distinct weights drawn uniformly with ``seed``), a 1-D
            integer tensor of flat indices into ``layer.weight``, or a pair ``(rows, cols)``.
        metrics: any of "loss", "kl", "flips"; the others are None in the result.
        backend: "auto" (compiled kernel for the device if built, else "torch"), "cpu", "cuda",
            "torch" (pure-PyTorch reference) or "naive" (zero, evaluate, restore).
        mode: "auto" uses the O(D) moment path where its truncation error is certified below
            1e-10 of each pair's KL, else the O(C) loop (the cpu kernel: the O(C) loop for every pair
            below 16 classes, where it is faster); "exact" always takes the O(C) loop.
        precision: "model" captures activations in the model's own dtype (one forward per batch);
            "float64" runs the captures on a float64 copy of the model, so the results agree with
            the naive loop run in float64 to ~1e-10 (costs a float64 forward and a model copy).
        device: where to compute; must be the model's device (inputs are moved there).
        batch_size: split each batch (or the (X, y) tensors, default 1024) into batches of at most
            this many samples; results do not depend on it beyond float64 rounding.
        by_class: also return ``class_loss`` (K, C) float64, delta_loss split by the samples'
            label, from the same pass. Needs K * C * 8 bytes on the device (plus one chunk's
            worth again): 32 MiB for 4096 weights and 1000 classes; meant for subsets of weights.
        max_memory: bytes of scratch the scoring may use at once (default 1 GiB): weights are
            scored in chunks that fit. Results do not depend on it.
        progress: None = a bar on a terminal only; True/False force it.

    Returns:
        AblationResult with per-weight float64 ``delta_loss`` (summed CE change), ``delta_kl``,
        int64 ``flips``/``new_errors``/``new_correct`` and ``exact_zero``.

    Accuracy: every per-sample change is computed without cancellation, so its error is a few
    roundings of the activations it comes from. With precision="model" on a float32 model the
    error of a summed delta is below ``1e-6 * sum_n |dCE_n|`` (a few float32 ulps of the
    per-sample changes: tested against the float64 naive loop); where the per-sample changes do
    not cancel across samples that is ~1e-7 relative. With precision="float64" the relative error
    is ~1e-12 for delta_loss (tested <= 1e-9).
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name, target = _resolve_layer(model, layer)
    if not isinstance(target, nn.Linear):
        raise TypeError(f"layer {name!r} is a {type(target).__name__}; only torch.nn.Linear layers can be ablated "
                        "(Conv2d comes in a later release)")
    metrics = _check_options(metrics, mode, seed)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    max_memory = check_max_memory(max_memory)
    device = _check_model(model, device)
    n_out, n_in = target.weight.shape
    flat = select_weights(weights, (n_out, n_in), seed)
    resolved = ops.resolve_backend(backend, device)
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        stream = batches(data, batch_size, device, target.weight.dtype)
        run = model
        if precision == "float64" and target.weight.dtype != torch.float64:
            run = copy.deepcopy(model).double()  # the user's model is never converted
            stream = ((x.double() if x.is_floating_point() else x, y) for x, y in stream)
        if resolved == "naive":
            out = naive_ablate(run, run.get_submodule(name), flat, list(stream), progress, by_class)
            method, head_desc = "naive", "zero, evaluate, restore"
            base_loss, base_acc, n_samples = out.pop("base_loss"), out.pop("base_accuracy"), out.pop("n_samples")
        else:
            scorer = ClosedForm(run, name, run.get_submodule(name), flat, resolved, mode, "flips" in metrics,
                                by_class)
            total = len(data) if hasattr(data, "__len__") and not isinstance(data, (tuple, list)) else None
            out, n_samples, base_loss, base_acc = sweep(scorer, stream, flat.numel(), by_class=by_class,
                                                        max_memory=max_memory, progress=progress, total_batches=total)
            method, head_desc = scorer.kind, scorer.description
    finally:
        for m, was_training in training.items():
            m.training = was_training
    keep = {"loss": ("delta_loss",), "kl": ("delta_kl",), "flips": ("flips", "new_errors", "new_correct")}
    for metric, keys in keep.items():
        if metric not in metrics:
            for k in keys:
                out[k] = None
    return AblationResult(
        indices=flat, rows=flat // n_in, cols=flat % n_in,
        weight=target.weight.detach().reshape(-1)[flat.to(device)].cpu().clone(),
        delta_loss=out["delta_loss"], delta_kl=out["delta_kl"], flips=out["flips"],
        new_errors=out["new_errors"], new_correct=out["new_correct"], exact_zero=out["exact_zero"],
        n_samples=n_samples, base_loss=base_loss, base_accuracy=base_acc, class_loss=out.get("class_loss"), layer=name,
        layer_shape=(n_out, n_in), method=method, head=head_desc, backend=resolved, mode=mode, precision=precision,
        seconds=time.perf_counter() - started)
