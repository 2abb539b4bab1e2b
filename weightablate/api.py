"""weightablate.ablate: the one entry point."""
from __future__ import annotations

import itertools
import time
import warnings

import torch
from torch import nn

from . import distributed, ops
from .checkpoint import Checkpoint, model_fingerprint, weights_fingerprint
from .data import batches, count_batches
from .dispatch import METHODS, choose_method
from .memory import check_max_memory
from .model_copy import copy_model
from .naive import naive_ablate
from .result import AblationResult
from .selection import select_weights
from . import structured
from .sweep import sweep
from .twins import IN_PROJ, in_proj_view
from .verify import self_check

METRICS = ("loss", "kl", "flips")
PARAMS = ("weight", "bias")
TARGETS = (nn.Linear, nn.Conv2d)
MODES = ("auto", "exact")
PRECISIONS = ("model", "float64")
HALF = (torch.float16, torch.bfloat16)


def _resolve_layer(model: nn.Module, layer) -> tuple[str, nn.Module]:
    if isinstance(layer, str):
        try:
            return layer, model.get_submodule(layer)
        except AttributeError:
            names = [n for n, m in model.named_modules() if isinstance(m, (*TARGETS, nn.MultiheadAttention))]
            raise ValueError(f"layer {layer!r} is not a module of the model; its Linear, Conv2d and "
                             f"MultiheadAttention layers are: {names}") from None
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ValueError("layer: the module given is not part of the model")
    raise TypeError(f"layer must be a dotted module name or an nn.Module, got {type(layer).__name__}")


def tf32_in_use(model: nn.Module, device: torch.device) -> list[str]:
    """What of ``model``'s float32 work on ``device`` PyTorch would run in TF32 (10-bit mantissa,
    far coarser than the float32 bound): cuDNN convolutions do by default. Read through the
    fp32_precision flags, which never raise (mixing the legacy allow_tf32 API with them can)."""
    if device.type != "cuda":
        return []
    used = []
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul == "tf32" or torch.get_float32_matmul_precision() != "highest":
        used.append("matmuls (torch.backends.cuda.matmul.fp32_precision / set_float32_matmul_precision)")
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is None:
        conv = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    if conv == "tf32" and any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        used.append("cuDNN convolutions (torch.backends.cudnn.conv.fp32_precision, 'tf32' by default)")
    return used


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
    for name, t in model.named_parameters():
        # the sum is finite when every element is (one cheap pass); it can also overflow: then look closer
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise ValueError(f"model: {name} contains NaN or inf")
    for prefix, module in model.named_modules():
        for bname, t in module.named_buffers(prefix=prefix, recurse=False):
            if not t.is_floating_point():
                continue
            if isinstance(module, nn.modules.batchnorm._NormBase):  # running statistics: finite
                if not torch.isfinite(t).all():
                    raise ValueError(f"model: {bname} contains NaN or inf")
            elif torch.isnan(t).any():  # other buffers may hold -inf (an attention mask), never NaN
                raise ValueError(f"model: buffer {bname} contains NaN")
    return model_device


def _original_values(weight: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The chosen weights' values (float32 for a half-precision layer: npz has no bfloat16)."""
    values = weight.detach().reshape(-1)[flat.to(weight.device)].cpu().clone()
    return values.float() if values.dtype in HALF else values


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
           progress: bool | None = None, param: str = "weight", method: str = "auto", checkpoint_dir=None,
           checkpoint_every: float = 60.0, verify: bool = True, structure: str = "weight") -> AblationResult:
    """The exact effect of zeroing each chosen weight (or bias entry) of ``layer``, alone, over all of ``data``.

    For each weight ``W[i, j]`` and sample ``n`` the change of unit ``i`` is one scalar
    ``d_n = s(z_ni - W_ij a_nj) - s(z_ni)`` and the logits move by ``d_n * V[:, i]`` (docs/DESIGN.md);
    the loss and KL changes are computed from that rank-one correction without ever subtracting
    two losses, and summed over samples in float64.

    Args:
        model: a classifier whose forward returns logits (N, C), or a language model returning
            per-token logits (N, T, V) with labels (N, T): then every token whose label is not -100
            counts as one prediction (weightablate.tokens; README "Transformers"). Used in eval mode; its modes are
            restored and its weights are never changed (bit-identical after the call).
        layer: dotted name (``"classifier.4"``) or the module itself: any ``nn.Linear`` or ``nn.Conv2d``
            (grouped and depthwise included) anywhere in the model, or an ``nn.MultiheadAttention``
            (self-attention, batch_first): its packed ``in_proj_weight`` (3E x E, rows q, k, v) or
            ``in_proj_bias``; ``res.param`` is then "in_proj_weight" or "in_proj_bias".
        data: a DataLoader, any iterable of ``(inputs, labels)`` batches, or a tuple ``(X, y)``.
        weights: None (every entry), an int K (K distinct entries drawn uniformly with ``seed``), a 1-D
            integer tensor of flat indices into ``layer.weight`` (or ``layer.bias``), or a pair
            ``(rows, cols)``: output unit/channel and flat index within its filter. ``"bias"`` is
            short for ``param="bias", weights=None``: every bias entry.
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
        max_memory: bytes of scratch the scoring may use at once (default 1 GiB), an int or a
            string like "2GiB": weights are scored in chunks that fit. Data is streamed batch by
            batch (capture, then scoring), so memory does not grow with the dataset's length:
            only one batch, its captures and one chunk of scratch are held at a time.
        progress: None = a bar when stdout and stderr are terminals; True/False force it.
        param: "weight" or "bias": which parameter of ``layer`` the indices refer to (of an
            nn.MultiheadAttention: its in_proj_weight or in_proj_bias; those names are accepted too).
        method: "auto" (the fastest that fits, below) or one of "closed_form", "funnel", "replay" to
            force it (a ValueError says why when it does not apply). Ignored by backend="naive".
        checkpoint_dir: a directory where the running sums are saved (atomically, with checksums
            and fingerprints of the model, layer, weights, options and data) after completed
            batches. Rerunning the same call after an interruption (even kill -9) resumes and
            gives a bit-identical result; a checkpoint from a different model, layer, data,
            weight set or options is refused with a CheckpointError (a ValueError).
        checkpoint_every: seconds between two checkpoint saves (default 60; 0 = after every
            batch); the end of the data is always saved.
        verify: the self-check (default True): before the sweep, the chosen method scores 4 of the
            chosen weights (the 2 largest |w|, 2 at random) on the first 8 samples and the float64
            zero-evaluate-restore loop does the same on a float64 copy of the model; a difference
            beyond the bound below raises weightablate.VerificationError naming the method and
            the weight, and no result is returned. ``res.extra["self_check"]`` says what it found.
        structure: "weight" (default: each weight alone), "out" (whole output units/channels: row k and
            bias k, with what follows the channel on its own, removed; every consumer of the channel
            sees zero from it; a ValueError where the channel meets a residual add, whose skip carries
            channel k on), "branch" (as "out", and at a residual add the add sees zero from this
            branch's channel k, the skip keeps it) or "in" (whole input features/channels: column k of
            the weight zeroed in this layer only). ``weights`` then indexes units (None, int K, or 1-D unit indices) and the
            result has one entry per unit (``res.structure``; ``weight`` holds the L2 norm of the
            removed weights). See weightablate/structured.py and the README.

    Half precision: a float16/bfloat16 model is run as a float32 copy (the captured activations
    and the scoring are float32; a UserWarning says so); inputs in the model's dtype are cast.

    Distributed: when torch.distributed is initialised (torchrun), the weights are split across
    the ranks by rows, each rank sweeps all the data for its share, and every rank returns the
    full result (equal to a one-process run). ablate writes no files except its checkpoints.

    Methods (``res.method``), the fastest exact one that fits is chosen (weightablate.dispatch):
    the closed forms of docs/DESIGN.md ("logits", "piecewise", "elementwise") for a Linear followed by
    element-wise maps and the final Linear; "funnel" for a layer whose changed channel reaches the
    final Linear through per-channel maps, a residual add and global average pooling (ResNet's last
    conv); "replay" for anything torch.fx can trace: the nodes that depend on the layer run again
    on the *changes* of their inputs for a chunk of ablations at a time (chunks sized by
    ``max_memory``): Linear/Conv/ReLU/max-pool/BatchNorm in the captured dtype with exact forms,
    other maps and the scoring in float64 (weightablate/propagate.py); ``res.head`` says why a
    faster method did not apply. The funnel and replay are tested against the float64 naive loop
    to 1e-5 relative (precision="float64") and within the bound below (precision="model").

    Returns:
        AblationResult with per-weight float64 ``delta_loss`` (summed CE change), ``delta_kl``,
        int64 ``flips``/``new_errors``/``new_correct`` and ``exact_zero``.

    Accuracy: every per-sample change is computed without cancellation, so its error is a few
    roundings of the activations it comes from; pairs with shifts beyond 30 are scored from the
    logits (exact when base probabilities underflow to 0, e.g. logits in the thousands). With
    precision="float64" the relative error is ~1e-12 for delta_loss (tested <= 1e-9). With
    precision="model" on a float32 model the scores are exact for the float32 activations and
    logits the model's own forward produces; against the float64 naive loop the error of a summed
    delta is at most ``1e-5 |delta| + 1e-4 sum_n |dCE_n| + E32``, where
    ``E32 = sum_n |dCE32_n - dCE_n|`` is the float32 forward's own error on the per-sample changes
    (tested). E32 is negligible for well-conditioned models (typically ~1e-7 relative in all) and
    grows where the forward loses float32 digits: logits with a large common offset, activations
    that cancel in a pre-activation (a unit at a ReLU kink inherits that rounding), deep BatchNorm
    stacks. Flips under exact ties follow the model's dtype: replay compares the ablated logits
    rounded to it, so a tie in the model's forward (e.g. at a clamp) is a tie here, won by the first
    index as in argmax. On a GPU the float32 bound assumes no TF32 (cuDNN convolutions use it by
    default): a UserWarning names the flag when the forward would.
    """
    started = time.perf_counter()
    name, target, weights, param = _check_target(model, layer, weights, param, structure, method)
    if isinstance(target, nn.MultiheadAttention):  # its packed in-projection, as an nn.Linear while this runs
        with in_proj_view(target):
            res = ablate(model, f"{name}.{IN_PROJ}" if name else IN_PROJ, data, weights, metrics=metrics,
                         backend=backend, mode=mode, precision=precision, device=device, batch_size=batch_size,
                         seed=seed, by_class=by_class, max_memory=max_memory, progress=progress, param=param,
                         method=method, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         verify=verify, structure=structure)
        res.layer, res.param = name, f"in_proj_{param}"
        return res
    metrics = _check_options(metrics, mode, seed)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    max_memory = check_max_memory(max_memory)
    device = _check_model(model, device)
    tensor = getattr(target, param)
    if structure != "weight":
        n_out, n_in = structured.n_units(target, structure), 1
        flat = structured.select_units(weights, target, structure, name, seed)
    else:
        n_out = tensor.shape[0]
        n_in = tensor[0].numel() if param == "weight" else 1
        flat = select_weights(weights, (n_out, n_in), seed)
    resolved = ops.resolve_backend(backend, device)
    rank, world_size = distributed.world()
    parts = distributed.partition(flat, n_in, world_size) if world_size > 1 else None
    local = flat[parts[rank]] if parts is not None else flat
    checkpoint = None
    if checkpoint_dir is not None:
        options = dict(backend=resolved, mode=mode, method=method, precision=precision, metrics=sorted(metrics),
                       **({"structure": structure} if structure != "weight" else {}),
                       by_class=by_class,
                       batch_size=batch_size, max_memory=max_memory, rank=rank, world_size=world_size)
        checkpoint = _checkpoint(checkpoint_dir, checkpoint_every, model, f"{name}.{param} {tuple(tensor.shape)}",
                                 local, options)
    checked = None
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        run, stream = _runnable(model, target, precision, batches(data, batch_size, device, target.weight.dtype),
                                device)
        run_target = run.get_submodule(name)  # the target in the model that actually runs (maybe a copy)
        if resolved == "naive":
            if structure != "weight":
                raise ValueError(f"backend='naive' with structure={structure!r}: the structured reference is "
                                 "weightablate.structured.naive_structured (the self-check runs it)")
            stream = list(stream)
            labels_dim = stream[0][1].dim() if stream else 1
            out = naive_ablate(run, run_target, flat, stream, progress, by_class, param)
            kind, head_desc, counts = "naive", "zero, evaluate, restore", {}
            base_loss, base_acc, n_samples = out.pop("base_loss"), out.pop("base_accuracy"), out.pop("n_samples")
        else:
            with distributed.fail_together():
                stream = iter(stream)
                first = next(stream)  # dispatch looks at one batch's shapes; it is still swept
                labels_dim = first[1].dim()
                if structure != "weight" and labels_dim == 2:
                    raise ValueError(f"structure={structure!r}: labels of shape {tuple(first[1].shape)} are per "
                                     "token; structured ablation scores (N, C) logits only (single weights, "
                                     "structure='weight', are scored per token)")
                stream = itertools.chain([first], stream)
                plan = _plan_structured if structure != "weight" else _plan_weights
                scorer, check = plan(run, name, run_target, param, structure, local, first, resolved, mode,
                                     "flips" in metrics, by_class, method, max_memory, seed)
                checked = check() if verify and local.numel() else None
                out, n_samples, base_loss, base_acc = sweep(scorer, stream, local.numel(), by_class=by_class,
                                                            max_memory=max_memory, progress=progress,
                                                            total_batches=count_batches(data, batch_size),
                                                            checkpoint=checkpoint)
            kind, head_desc = scorer.kind, scorer.description
            counts = getattr(scorer, "counts", {})  # the fused/moment paths' pairs and their exact fraction
            if parts is not None:
                out = distributed.gather(parts, out, flat.numel())
    finally:
        for m, was_training in training.items():
            m.training = was_training
    for metric, keys in {"loss": ("delta_loss",), "kl": ("delta_kl",),
                         "flips": ("flips", "new_errors", "new_correct")}.items():
        if metric not in metrics:
            for k in keys:
                out[k] = None
    extra = {**({"counted": "tokens"} if labels_dim == 2 else {}),  # labels (N, T): per-token predictions
             **({"computed_in": f"float32 (a float32 copy of the {tensor.dtype} model)"}
                if tensor.dtype in HALF and precision == "model" else {}),
             **({"self_check": checked} if checked else {}), **counts}
    return AblationResult(
        indices=flat, rows=flat // n_in, cols=flat % n_in,
        weight=(_original_values(tensor, flat) if structure == "weight"
                else structured.unit_norms(target, structure, flat)),
        delta_loss=out["delta_loss"], delta_kl=out["delta_kl"], flips=out["flips"],
        new_errors=out["new_errors"], new_correct=out["new_correct"], exact_zero=out["exact_zero"],
        n_samples=n_samples, base_loss=base_loss, base_accuracy=base_acc, class_loss=out.get("class_loss"), layer=name,
        layer_shape=(n_out, n_in), weight_shape=tuple(tensor.shape), param=param, method=kind, head=head_desc,
        backend=resolved, mode=mode, structure=structure,
        precision=precision, seconds=time.perf_counter() - started, extra=extra)


def _check_target(model, layer, weights, param, structure, method):
    """The target layer by name and module, and ``weights``/``param`` with the "bias" shorthand
    expanded; a TypeError/ValueError naming the argument otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name, target = _resolve_layer(model, layer)
    if isinstance(target, nn.MultiheadAttention):
        param = _check_mha(name, target, param, structure)
    elif not isinstance(target, TARGETS):
        raise TypeError(f"layer {name!r} is a {type(target).__name__}; only torch.nn.Linear and torch.nn.Conv2d "
                        "layers (and nn.MultiheadAttention's in_proj_weight) can be ablated")
    if structure not in structured.STRUCTURES:
        raise ValueError(f"structure must be one of {structured.STRUCTURES}, got {structure!r}")
    if structure != "weight" and (param != "weight" or isinstance(weights, str)):
        raise ValueError(f"structure={structure!r} removes whole units (their bias included for 'out'): use "
                         "param='weight' and weights=None, an int or unit indices")
    if isinstance(weights, str):
        if weights != "bias":
            raise TypeError(f"weights: the only string accepted is 'bias' (every bias entry), got {weights!r}")
        weights, param = None, "bias"
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if param not in PARAMS:
        raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
    if isinstance(target, nn.MultiheadAttention):
        _check_in_proj(name, target, param)
    elif param == "bias" and target.bias is None:
        raise ValueError(f"param='bias' but layer {name!r} has no bias")
    return name, target, weights, param


MHA_PARAMS = {"weight": "weight", "bias": "bias", "in_proj_weight": "weight", "in_proj_bias": "bias"}


def _check_mha(name, mha: nn.MultiheadAttention, param, structure) -> str:
    """An nn.MultiheadAttention target: its packed in_proj_weight (param "weight") or in_proj_bias
    ("bias"); a ValueError naming what it cannot be. Returns param as "weight" or "bias"."""
    if not mha._qkv_same_embed_dim:
        raise ValueError(f"layer {name!r} is an nn.MultiheadAttention with kdim/vdim other than embed_dim: its q, k "
                         "and v projections are separate parameters (q_proj_weight, k_proj_weight, v_proj_weight), "
                         "not a packed in_proj_weight, and cannot be targets; its out_proj is an nn.Linear target, "
                         "or write the attention with nn.Linear q, k, v layers and F.scaled_dot_product_attention")
    if structure != "weight":
        raise ValueError(f"structure={structure!r}: layer {name!r} is an nn.MultiheadAttention, whose packed "
                         "in_proj_weight is ablated one entry at a time only (structure='weight')")
    if param not in MHA_PARAMS:
        raise ValueError(f"param must be one of {tuple(MHA_PARAMS)} for an nn.MultiheadAttention, got {param!r}")
    return MHA_PARAMS[param]


def _check_in_proj(name, mha: nn.MultiheadAttention, param: str) -> None:
    if param == "bias" and mha.in_proj_bias is None:
        raise ValueError(f"param='bias' but layer {name!r} has no in_proj_bias (built with bias=False)")
    if not all(isinstance(t, nn.Parameter) for t in (mha.in_proj_weight, mha.in_proj_bias) if t is not None):
        raise ValueError(f"layer {name!r}: its in_proj_weight or in_proj_bias is computed (torch.nn.utils.prune, a "
                         "parametrization), not a Parameter, which weightablate cannot zero one entry of; remove "
                         "that on a copy first")


def _checkpoint(directory, every, model, layer: str, local, options: dict) -> Checkpoint:
    """The sweep's checkpoint, fingerprinted by model, layer, weight set and options (a different
    run is refused on resume); one file per rank under torchrun."""
    if options["backend"] == "naive":
        raise ValueError("checkpoint_dir: the naive backend is the reference loop and does not checkpoint")
    rank, world_size = options["rank"], options["world_size"]
    return Checkpoint(directory, {"model": model_fingerprint(model), "layer": layer,
                                  "weights": weights_fingerprint(local), "options": repr(sorted(options.items()))},
                      every=every, name="sweep" if world_size == 1 else f"sweep-rank{rank}-of-{world_size}")


def _runnable(model: nn.Module, target: nn.Module, precision: str, stream, device):
    """The model that runs (the user's, or a float64 / float32 copy: the user's is never converted)
    and the batches cast to its dtype; warns when a float32 forward would run in TF32."""
    run = model
    if precision == "float64" and target.weight.dtype != torch.float64:
        run = copy_model(model, torch.float64)
        stream = ((x.double() if x.is_floating_point() else x, y) for x, y in stream)
    elif target.weight.dtype in HALF:
        warnings.warn(f"ablate: the model is {target.weight.dtype}; it is run as a float32 copy, so the "
                      "captured activations and the scores are computed in float32", UserWarning, stacklevel=3)
        run = copy_model(model, torch.float32)
        stream = ((x.float() if x.is_floating_point() else x, y) for x, y in stream)
    runs_in = torch.float64 if precision == "float64" else (torch.float32 if target.weight.dtype in HALF
                                                             else target.weight.dtype)
    if runs_in == torch.float32:
        tf32 = tf32_in_use(run, device)
        if tf32:
            warnings.warn("ablate: on this GPU PyTorch runs " + " and ".join(tf32) + " in TF32, so the "
                          "captured activations, and the scores, are not exact to float32 rounding; set that "
                          "flag to 'ieee' or pass precision='float64'", UserWarning, stacklevel=3)
    return run, stream


def _plan_weights(run, name, target, param, structure, local, first, backend, mode, want_flips, by_class, method,
                  max_memory, seed):
    """The method for single entries (weightablate.dispatch) and its self-check (weightablate.verify)."""
    scorer = choose_method(run, name, target, param, local, first[0], backend, mode, want_flips, by_class, method)

    def score(model_, weights, x, y):  # the same method, on a few weights and samples of model_
        probe = choose_method(model_, name, model_.get_submodule(name), param, weights, x, backend, mode, True,
                              False, method, graph=scorer.graph if model_ is run else None)
        return sweep(probe, [(x, y)], weights.numel(), by_class=False, max_memory=max_memory, progress=False)[0]

    return scorer, lambda: self_check(run, name, target, param, local, first[0], first[1], score, seed, scorer.kind)


def _plan_structured(run, name, target, param, structure, local, first, backend, mode, want_flips, by_class, method,
                     max_memory, seed):
    """The method for whole units (weightablate.structured) and its self-check."""
    if method != "auto":
        raise ValueError(f"method={method!r} with structure={structure!r}: the structured path picks its "
                         "method itself (res.method says which ran)")
    scorer = structured.Structured(run, name, target, structure, local, backend, mode, want_flips, by_class,
                                   x=first[0])
    probe = {}

    def score(units, x, y):
        probe["m"] = structured.Structured(run, name, target, structure, units, backend, mode, True, False,
                                           graph=scorer.graph)
        return sweep(probe["m"], [(x, y)], units.numel(), by_class=False, max_memory=max_memory, progress=False)[0]

    return scorer, lambda: structured.self_check(run, name, target, structure, local, first[0], first[1], score,
                                                 seed, lambda: probe["m"].end.name)
