"""Pruning with exact single-weight importance, on top of ``torch.nn.utils.prune``.

Everything here produces the standard ``torch.nn.utils.prune`` reparametrisation (``weight_orig``,
a ``weight_mask`` buffer and a forward pre-hook), so pruned weights stay exactly zero while the
rest are fine-tuned, and ``remove`` (``prune.remove``) turns them back into plain parameters.

Score convention: every score is an *importance*, **higher = more important = pruned later**, a
float64 tensor shaped like ``layer.weight``. Per criterion (``SCORE_SIGNS`` holds these lines):

* ``"exact"``: **signed**. ``ablate(...).delta_loss``: ``sum_n CE_n(W[i,j] = 0) - CE_n(W)`` over
  ``data``. Positive: the weight helps; **negative: zeroing it lowers the loss** (common: 30-45% of
  a trained layer's weights on its own train split). Already-pruned weights score 0 (their delta is
  exactly 0).
* ``"taylor2"``: signed, ``-g W + 0.5 h W^2`` (second-order estimate of the same delta_loss).
* ``"magnitude"`` ``|W|``, ``"squared"`` ``W^2``, ``"wanda"`` ``|W| * ||a_j||``, ``"taylor"``
  ``|g W|``, ``"obd"`` ``0.5 h W^2`` (exact diagonal Hessian): all ``>= 0``.

Mind the sign when handing scores to torch: ``torch.nn.utils.prune.L1Unstructured`` (and
``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, importance_scores=...)``)
ranks by ``abs(score)``, so a weight whose removal *lowers* the loss by a lot would be kept as if it
were important. ``SignedUnstructured`` ranks by the signed score (smallest first: the weights whose
removal increases the loss least, or decreases it most, go first); it is what every function here
uses unless ``ranking="abs"`` asks for torch's behaviour (for comparison only).
"""
from __future__ import annotations

import copy
import numbers
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as tprune

from .api import _resolve_layer, ablate

CRITERIA = ("exact", "magnitude", "squared", "wanda", "taylor", "obd", "taylor2")
RANKINGS = ("signed", "abs")
SCORE_SIGNS = {
    "exact": "signed: delta_loss = sum_n CE_n(W_ij = 0) - CE_n(W) over data; > 0 the weight helps, "
             "< 0 zeroing it lowers the loss",
    "taylor2": "signed: -g W + 0.5 h W^2, a second-order estimate of delta_loss",
    "magnitude": ">= 0: |W|",
    "squared": ">= 0: W^2",
    "wanda": ">= 0: |W| * ||a_j||_2 (input norm over data)",
    "taylor": ">= 0: |g W| (g: gradient of the loss over data)",
    "obd": ">= 0: 0.5 h W^2 (h: exact diagonal Hessian of the loss over data)",
}
CHANNEL_SCORE_LABEL = ("sum of the single-weight scores of the channel's weights; "
                       "NOT the effect of removing the whole channel")
DEFAULT_CRITERION = "wanda"  # the evidence of benchmarks/prune_experiment.py: see the README, "Pruning"
_DATA_FREE = ("magnitude", "squared")
_CLOSED_FORM_ONLY = ("obd", "taylor2")  # need the exact Hessian diagonal of weightablate.plan's closed form
# ablate's messages for a layer or model it cannot score at all, as opposed to bad data
_STRUCTURAL = ("cannot trace", "only torch.nn.Linear", "more than once", "did not run", "not called",
               "must return a logits")


# --- layers and the torch.nn.utils.prune reparametrisation -------------------------------------

def _layer_names(model: nn.Module, layers) -> list[str]:
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError("layers: give one or more dotted names or modules of the model")
    names = [_resolve_layer(model, layer)[0] for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"layers: {names} names a layer twice")
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise TypeError(f"layer {name!r} ({type(module).__name__}) has no weight tensor to prune")
    return names


def _pruning_hooks(module: nn.Module):
    """The torch.nn.utils.prune forward pre-hooks of ``module``."""
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, tprune.BasePruningMethod)]


def is_pruned(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is reparametrised by ``torch.nn.utils.prune``."""
    return any(h._tensor_name == name for h in _pruning_hooks(module))


def _refresh(model: nn.Module) -> None:
    """Recompute every pruned ``module.weight`` from ``weight_orig * weight_mask`` now, as a tensor
    without autograd history. The forward pre-hook only does it at the next forward, so after an
    optimizer step ``module.weight`` is stale (the closed-form scorer reads it), and while it holds a
    graph the model cannot be deep-copied."""
    with torch.no_grad():
        for module in model.modules():
            for hook in _pruning_hooks(module):
                setattr(module, hook._tensor_name, hook.apply_mask(module))


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every pruning reparametrisation made permanent (pruned weights: zeros)."""
    _refresh(model)
    plain = copy.deepcopy(model)
    for module in plain.modules():
        for hook in _pruning_hooks(module):
            tprune.remove(module, hook._tensor_name)
    return plain


def remove(model: nn.Module, layers=None) -> nn.Module:
    """``torch.nn.utils.prune.remove`` on every pruned tensor of ``layers`` (default: the whole model):
    the pruned weights become plain parameters, zeros where the mask was 0. Returns ``model``."""
    modules = model.modules() if layers is None else (model.get_submodule(n) for n in _layer_names(model, layers))
    for module in modules:
        for hook in _pruning_hooks(module):
            tprune.remove(module, hook._tensor_name)
    return model


def mask_of(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The current 0/1 mask of ``module.<name>`` (all ones when it is not pruned), bool."""
    mask = getattr(module, name + "_mask", None)
    if mask is None:
        return torch.ones_like(getattr(module, name), dtype=torch.bool)
    return mask != 0


def sparsity(model: nn.Module, layers) -> dict:
    """Fraction of pruned (masked) weights: ``{"global": s, "layers": {name: s}}``; for a layer that
    is not reparametrised, the fraction of weights that are exactly zero."""
    per, zeros, total = {}, 0, 0
    for name in _layer_names(model, layers):
        module = model.get_submodule(name)
        if is_pruned(module):
            z = int((~mask_of(module)).sum())
        else:
            z = int((module.weight == 0).sum())
        n = module.weight.numel()
        per[name] = z / n
        zeros += z
        total += n
    return {"global": zeros / total, "layers": per, "pruned": zeros, "total": total}


_sparsity = sparsity  # iterative() takes an argument of that name


# --- scores ------------------------------------------------------------------------------------

def _criterion_fn(criterion):
    if callable(criterion):
        return criterion
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA} or a callable (model, layer, data) -> scores, "
                         f"got {criterion!r}")
    try:
        from . import criteria
    except ImportError as exc:
        raise ImportError(f"criterion={criterion!r} needs weightablate.criteria: {exc}") from exc
    fn = getattr(criteria, criterion)
    if criterion in _DATA_FREE:
        return lambda model, layer, data: fn(model.get_submodule(layer))
    return fn


def _scorable_error(name: str, exc: Exception) -> ValueError:
    return ValueError(
        f"criterion='exact' cannot score layer {name!r}: {exc} (weightablate.prune.scorable_layers(model, data) "
        "lists the layers it can score); pick those layers or another criterion")


def _exact_scores(model, name, data, unpruned, ablate_kwargs):
    weight = model.get_submodule(name).weight
    out = torch.zeros(weight.numel(), dtype=torch.float64)
    idx = None
    if unpruned is not None:
        idx = torch.nonzero(unpruned.reshape(-1).cpu()).reshape(-1)
        if idx.numel() == 0:
            return out.reshape(weight.shape)
        if idx.numel() == weight.numel():
            idx = None
    kwargs = {"progress": False, **ablate_kwargs}  # any method ablate has: closed form, funnel or replay
    try:
        res = ablate(model, name, data, weights=idx, metrics=("loss",), **kwargs)
    except (ValueError, TypeError) as exc:
        if any(key in str(exc) for key in _STRUCTURAL):
            raise _scorable_error(name, exc) from exc
        raise
    out[res.indices] = res.delta_loss
    return out.reshape(weight.shape)


def layer_scores(model: nn.Module, layers, data, criterion="exact", **ablate_kwargs) -> dict[str, torch.Tensor]:
    """Importance of every weight of each layer: ``{name: float64 tensor shaped like its weight}``
    (CPU), higher = more important; the sign convention of each criterion is in ``SCORE_SIGNS``.

    Pruned layers are scored on a copy of the model with the masks made permanent, so a pruned
    weight is an exact zero there (its exact delta is 0 and it is not re-ablated).
    ``ablate_kwargs`` (backend, mode, precision, batch_size, progress) go to ``ablate`` for "exact".
    ``criterion`` may also be a callable ``(model, layer_name, data) -> scores``.
    """
    names = _layer_names(model, layers)
    fn = None if criterion == "exact" else _criterion_fn(criterion)
    if ablate_kwargs and criterion != "exact":
        raise TypeError(f"{sorted(ablate_kwargs)}: ablate options apply to criterion='exact' only")
    pruned = {n: mask_of(model.get_submodule(n)) for n in names if is_pruned(model.get_submodule(n))}
    reparametrised = any(_pruning_hooks(m) for m in model.modules())
    scored = _plain_copy(model) if reparametrised else model
    out = {}
    for name in names:
        shape = scored.get_submodule(name).weight.shape
        if fn is None:
            s = _exact_scores(scored, name, data, pruned.get(name), ablate_kwargs)
        else:
            s = fn(scored, name, data)
        s = torch.as_tensor(s)
        if tuple(s.shape) != tuple(shape):
            raise ValueError(f"criterion {criterion!r} returned scores of shape {tuple(s.shape)} for layer {name!r} "
                             f"of shape {tuple(shape)}")
        s = s.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(s).all():
            raise ValueError(f"criterion {criterion!r} returned NaN or inf scores for layer {name!r}")
        out[name] = s
    return out


def importance(model: nn.Module, layer, data, criterion="exact", **ablate_kwargs) -> torch.Tensor:
    """The scores of one layer (``layer_scores`` for a single layer): float64, shaped like its weight.
    For "exact" this is ``ablate(model, layer, data).delta_loss`` reshaped to the weight's shape."""
    (name,) = _layer_names(model, layer)
    return layer_scores(model, [name], data, criterion, **ablate_kwargs)[name]


def scorable_layers(model: nn.Module, data, criterion="exact", kinds=(nn.Linear,)) -> list[str]:
    """The layers of the types ``kinds`` (default nn.Linear; add nn.Conv2d for convolutions) that
    ``criterion`` can score, in the model's order, tried on the first batch of ``data``.

    "exact" scores every layer ``ablate`` scores: any Linear or Conv2d of a model whose layers run
    once per forward and that torch.fx can trace (or whose head has a closed form); "obd" and
    "taylor2" need the exact Hessian diagonal, i.e. the closed form of ``weightablate.plan`` (a
    Linear producing the logits or followed by element-wise modules and the final Linear); the
    other criteria score any Linear or Conv2d."""
    batch = _first_batch(data)
    fn = None if criterion == "exact" else _criterion_fn(criterion)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or is_pruned(module):
            continue
        try:
            if fn is None:
                ablate(model, name, batch, weights=torch.tensor([0]), metrics=("loss",), progress=False)
            else:
                fn(model, name, batch)
        except (ValueError, TypeError):
            continue
        names.append(name)
    return names


def _first_batch(data):
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0][:8], data[1][:8]
    for x, y in data:
        return x[:8], y[:8]
    raise ValueError("data: no samples")


def channel_importance(scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Per-channel importance in the style of Torch-Pruning: the float64 sum of the single-weight
    scores of each channel of a Linear weight (out, in): ``dim=0`` per output channel (row sums),
    ``dim=1`` per input channel (column sums). The label ``CHANNEL_SCORE_LABEL`` applies: for
    "exact", a sum of single-weight effects, *not* the effect of removing the channel (zeroing a
    whole row changes the unit non-additively). Sign as the weight scores (higher = keep)."""
    if scores.dim() != 2 or dim not in (0, 1, -1, -2):
        raise ValueError(f"channel_importance: expected (out, in) scores and dim 0 or 1, got shape "
                         f"{tuple(scores.shape)}, dim={dim}")
    return scores.to(torch.float64).sum(dim=1 if dim in (0, -2) else 0)


# --- the pruning method: signed ranking --------------------------------------------------------

class SignedUnstructured(tprune.BasePruningMethod):
    """Prune the (currently unpruned) entries with the *smallest signed* importance scores.

    ``torch.nn.utils.prune.L1Unstructured`` with ``importance_scores`` ranks by ``abs(score)``,
    which is right for magnitudes but wrong for signed scores such as exact delta_loss: there a
    weight whose removal lowers the loss by a lot (large negative delta) is the first to remove, not
    the last. Ties are broken by position (a stable sort), so the mask is deterministic.

    Args:
        amount (int or float): as in torch: a fraction in [0, 1] of the currently unpruned entries
            (rounded), or an absolute number of entries.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount) -> None:
        tprune._validate_pruning_amount_init(amount)
        self.amount = amount

    def compute_mask(self, t, default_mask):
        n = t.nelement()
        k = tprune._compute_nparams_toprune(self.amount, n)
        tprune._validate_pruning_amount(k, n)
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if k:
            order = torch.sort(t.reshape(-1), stable=True).indices[:k]
            mask.view(-1)[order] = 0
        return mask

    @classmethod
    def apply(cls, module, name, amount, importance_scores=None):  # type: ignore[override]
        return super().apply(module, name, amount=amount, importance_scores=importance_scores)


def signed_unstructured(module: nn.Module, name: str, amount, importance_scores=None) -> nn.Module:
    """Like ``torch.nn.utils.prune.l1_unstructured`` but removing the smallest *signed* scores."""
    SignedUnstructured.apply(module, name, amount=amount, importance_scores=importance_scores)
    return module


def global_unstructured(model: nn.Module, layers, amount, data, criterion=DEFAULT_CRITERION, *,
                        ranking: str = "signed",
                        scores: dict | None = None, **ablate_kwargs) -> dict[str, torch.Tensor]:
    """Prune ``amount`` of the weights of ``layers`` together, least important first, with
    ``torch.nn.utils.prune.global_unstructured`` and the criterion's scores as ``importance_scores``.

    Args:
        model: the model; pruned in place (standard ``weight_orig``/``weight_mask`` reparametrisation;
            ``remove(model)`` makes it permanent). Already-pruned weights stay pruned.
        layers: one or several dotted names or modules (their ``weight`` is pruned).
        amount: as in torch: a float fraction of the currently *unpruned* weights of all the layers
            together (rounded), or an int number of weights.
        data: scoring data, like ``ablate``'s (a DataLoader, batches, or ``(X, y)``); unused by
            "magnitude"/"squared". Use training data: scoring on the test set leaks it.
        criterion: one of ``CRITERIA`` or a callable ``(model, layer_name, data) -> scores``;
            signs in ``SCORE_SIGNS`` (higher = keep). Scores of all layers are ranked together.
            Default "wanda" (``DEFAULT_CRITERION``): in benchmarks/prune_experiment.py it keeps the
            accuracy at every sparsity, before and after fine-tuning, scores any Linear or Conv2d in
            one forward pass; the signed "exact" delta is a poor *pruning* criterion (removing many
            weights whose single removal lowers the loss wrecks the model: not additive).
        ranking: "signed" (``SignedUnstructured``: smallest score removed first, the right order for
            signed scores) or "abs" (``prune.L1Unstructured``: smallest ``|score|`` first, torch's
            behaviour, which keeps weights whose removal lowers the loss; for comparison only).
        scores: precomputed ``{name: scores}`` (e.g. from ``layer_scores``); skips scoring.
        ablate_kwargs: passed to ``ablate`` for criterion="exact" (backend, mode, precision, ...).

    Returns:
        the scores used, ``{name: float64 tensor shaped like the weight}``.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    names = _layer_names(model, layers)
    if scores is None:
        scores = layer_scores(model, names, data, criterion, **ablate_kwargs)
    elif set(scores) != set(names):
        raise ValueError(f"scores: expected the layers {names}, got {sorted(scores)}")
    method = SignedUnstructured if ranking == "signed" else tprune.L1Unstructured
    params, importance_scores = [], {}
    for name in names:
        module = model.get_submodule(name)
        params.append((module, "weight"))
        importance_scores[(module, "weight")] = scores[name].to(module.weight.device)
    tprune.global_unstructured(params, pruning_method=method, importance_scores=importance_scores, amount=amount)
    return scores


# --- fine-tuning, evaluation and the iterative schedule ---------------------------------------

def _model_device_dtype(model):
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _to(x, y, device, dtype):
    if x.is_floating_point():
        x = x.to(device=device, dtype=dtype)
    else:
        x = x.to(device)
    return x, y.to(device=device, dtype=torch.int64)


def evaluate(model: nn.Module, data, batch_size: int = 1024) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` (eval mode, modes restored) over ``data``."""
    device, dtype = _model_device_dtype(model)
    training = {m: m.training for m in model.modules()}
    model.eval()
    ce, correct, n = 0.0, 0, 0
    try:
        with torch.no_grad():
            if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
                X, Y = data
                it = ((X[s:s + batch_size], Y[s:s + batch_size]) for s in range(0, X.shape[0], batch_size))
            else:
                it = data
            for x, y in it:
                x, y = _to(x, y, device, dtype)
                logits = model(x).double()
                ce += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                n += y.numel()
    finally:
        for m, was in training.items():
            m.training = was
    if n == 0:
        raise ValueError("data: no samples")
    return ce / n, correct / n


def finetune(model: nn.Module, data, epochs: int, *, lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
             weight_decay: float = 0.0, threads: int | None = None) -> nn.Module:
    """Train ``model`` for ``epochs`` with Adam on cross-entropy; pruned weights stay exactly zero
    (the prune masks are applied at every forward and their gradient is masked).

    ``data``: ``(X, y)`` (shuffled into ``batch_size`` mini-batches with a generator seeded by
    ``seed``) or a DataLoader / iterable of batches (used as it comes, every epoch). The global RNG
    is seeded with ``seed`` inside a fork (dropout etc.), so runs are reproducible and the caller's
    RNG state is untouched. ``threads``: torch threads during training (restored after); 1 is the
    fastest for tiny models. The model is left in eval mode. Returns ``model``.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    device, dtype = _model_device_dtype(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if epochs == 0 or not params:
        return model.eval()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(int(seed))
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
            model.train()
            tensors = isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)
            for _ in range(epochs):
                if tensors:
                    X, Y = data
                    perm = torch.randperm(X.shape[0], generator=g)
                    it = ((X[perm[s:s + batch_size]], Y[perm[s:s + batch_size]])
                          for s in range(0, X.shape[0], batch_size))
                else:
                    it = data
                for x, y in it:
                    x, y = _to(x, y, device, dtype)
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
    finally:
        model.eval()
        _refresh(model)
        if threads is not None:
            torch.set_num_threads(old_threads)
    return model


def schedule(target: float, steps: int) -> list[float]:
    """Cumulative sparsities of a geometric schedule: each step removes the same fraction of the
    weights still left, ``1 - (1 - target) ** (k / steps)`` for k = 1..steps."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target sparsity must lie in (0, 1), got {target}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [1.0 - (1.0 - target) ** (k / steps) for k in range(1, steps + 1)]


def iterative(model: nn.Module, layers, sparsity, data, *, criterion=DEFAULT_CRITERION, steps: int = 3,
              epochs: int = 2,
              train_data=None, eval_data=None, lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
              ranking: str = "signed", threads: int | None = None, log=None, **ablate_kwargs) -> list[dict]:
    """Iterative pruning: prune a fraction, fine-tune with the masks held, re-score on the pruned
    model, repeat until the target sparsity.

    Args:
        sparsity: the target (a float in (0, 1), reached in ``steps`` geometric steps, see
            ``schedule``) or an increasing sequence of cumulative sparsities, one step each (e.g.
            ``(0.5, 0.8, 0.9, 0.95)``: every milestone gets the same fine-tuning budget).
            Sparsity is counted over the weights of ``layers`` together (global ranking).
        data: the scoring data (train data; "exact" recomputes each weight's delta on the pruned
            and fine-tuned model at every step).
        train_data: fine-tuning data (default ``data``); ``epochs`` per step (0: no fine-tuning).
        eval_data: if given, loss and accuracy are measured after each pruning and each fine-tune.
        seed: fine-tuning seed (step k uses ``seed + k``); scores are deterministic.
        log: a callable for one status line per step, or None.
        criterion, ranking, ablate_kwargs: as in ``global_unstructured``.

    Returns:
        one dict per step: ``step``, ``target`` and ``sparsity`` (achieved), ``pruned``, ``layers``
        (per-layer sparsity), ``negative_scores`` (fraction of the still-unpruned weights whose score
        was < 0 at that step: for "exact", zeroing them alone lowers the loss), ``score_s``, ``finetune_s``, and with ``eval_data`` ``loss_pruned``,
        ``accuracy_pruned`` (right after pruning) and ``loss``, ``accuracy`` (after fine-tuning).
        The model is left pruned (reparametrised); ``remove(model)`` makes the zeros permanent.
    """
    names = _layer_names(model, layers)
    single = isinstance(sparsity, numbers.Real) or (isinstance(sparsity, torch.Tensor) and sparsity.dim() == 0)
    targets = schedule(float(sparsity), steps) if single else [float(s) for s in sparsity]
    if not targets or any(not 0.0 <= s < 1.0 for s in targets) or any(b < a for a, b in zip(targets, targets[1:])):
        raise ValueError(f"sparsity: expected a target in (0, 1) or increasing sparsities in [0, 1), got {sparsity!r}")
    train_data = data if train_data is None else train_data
    say = log or (lambda msg: None)
    history = []
    for k, target in enumerate(targets):
        state = _sparsity(model, names)
        n_prune = max(0, int(round(target * state["total"])) - state["pruned"])
        started = time.perf_counter()
        rec = {"step": k + 1, "target": target}
        if n_prune:
            masks = [mask_of(model.get_submodule(n)).reshape(-1).cpu() for n in names]
            scores = global_unstructured(model, names, n_prune, data, criterion, ranking=ranking, **ablate_kwargs)
            alive = torch.cat([scores[n].reshape(-1)[m] for n, m in zip(names, masks)])
            rec["negative_scores"] = float((alive < 0).double().mean()) if alive.numel() else 0.0
        score_s = time.perf_counter() - started
        if eval_data is not None:
            rec["loss_pruned"], rec["accuracy_pruned"] = evaluate(model, eval_data)
        started = time.perf_counter()
        finetune(model, train_data, epochs, lr=lr, batch_size=batch_size, seed=seed + k, threads=threads)
        rec["finetune_s"] = time.perf_counter() - started
        rec["score_s"] = score_s
        if eval_data is not None:
            rec["loss"], rec["accuracy"] = evaluate(model, eval_data)
        state = _sparsity(model, names)
        rec.update(sparsity=state["global"], pruned=state["pruned"], layers=state["layers"])
        history.append(rec)
        line = f"step {k + 1}/{len(targets)}: sparsity {state['global']:.4f} ({state['pruned']}/{state['total']})"
        if eval_data is not None:
            line += (f", accuracy {rec['accuracy_pruned']:.4f} pruned -> {rec['accuracy']:.4f} fine-tuned, "
                     f"loss {rec['loss_pruned']:.4f} -> {rec['loss']:.4f}")
        say(line)
    return history


# Torch-Pruning importance objects (imported last: they use importance() above)
from .tp_importance import (ChannelImportance, ExactChannelImportance, SummedWeightImportance,  # noqa: E402,F401
                            UnscorableGroup, UnscorableGroupWarning)
