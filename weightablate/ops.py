"""The two custom ops, dispatched to the compiled kernels or to the PyTorch reference.

``pair_deltas`` (stage 1) and ``score_deltas`` (stage 2) have one signature each, declared in
``csrc/weightablate.cpp``; ``weightablate._reference`` implements the same signatures in plain
PyTorch and is what the kernels are tested against.
"""
from __future__ import annotations

import warnings

import torch

from . import _fused_reference, _reference

BACKENDS = ("auto", "cpu", "cuda", "torch", "naive")
# Compiled kernels that backend="auto" picks. The CUDA kernels compile everywhere but have not
# yet run on a GPU (benchmarks/gpu_check.sh does that): until then they are opt-in (backend="cuda")
# and "auto" on CUDA tensors uses the tested PyTorch reference.
AUTO_KERNELS = ("cpu",)

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.weightablate.*)

    _LOAD_ERROR = None
except ImportError as exc:  # the pure-PyTorch reference still works
    _LOAD_ERROR = exc

_warned = False


def _has_kernel(op: str, key: str) -> bool:
    return _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"weightablate::{op}", key)


def compiled_backends() -> list[str]:
    """Devices with compiled kernels in this build: a subset of ``["cpu", "cuda"]``."""
    return [b for b, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _has_kernel("score_deltas", key)]


if _LOAD_ERROR is None:
    # Fake (meta) kernels, registered only once the library is known to be loaded.
    @torch.library.register_fake("weightablate::pair_deltas")
    def _pair_deltas_fake(a_t, z_t, rows, cols, w, gain, shift, slope):
        return a_t.new_empty((rows.shape[0], a_t.shape[1]), dtype=torch.float64)

    @torch.library.register_fake("weightablate::score_deltas")
    def _score_deltas_fake(d, unit, head, probs, logits, labels, moments, moment_slot, flips, by_class=False):
        k = d.shape[0]
        f, i = d.new_empty(k), d.new_empty(k, dtype=torch.int64)
        split = d.new_empty((k, probs.shape[1] if by_class else 0))
        return f, f.clone(), i, i.clone(), i.clone(), d.new_empty(k, dtype=torch.bool), split

    if hasattr(torch.ops.weightablate, "fused_scores"):  # a library built before the op lacks it
        @torch.library.register_fake("weightablate::fused_scores")
        def _fused_scores_fake(a_t, z_t, rows, cols, w, gain, shift, slope, head, probs, logits, labels, moments,
                               mean_gap, moment_slot, flips, by_class=False):
            k = rows.shape[0]
            f, i = probs.new_empty(k), probs.new_empty(k, dtype=torch.int64)
            split = probs.new_empty((k, probs.shape[1] if by_class else 0))
            return (f, f.clone(), i, i.clone(), i.clone(), probs.new_empty(k, dtype=torch.bool), split, i.clone(),
                    i.clone())

    if hasattr(torch.ops.weightablate, "token_moment_scores"):
        @torch.library.register_fake("weightablate::token_moment_scores")
        def _token_moment_scores_fake(alpha, beta, slot, moments, gap_a, gap_b, a_max, q, unit_range, n_vocab,
                                      certify):
            return alpha.new_empty(alpha.shape), alpha.new_empty(alpha.shape), alpha.new_empty(alpha.shape,
                                                                                               dtype=torch.bool)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run on ``device``: "cpu", "cuda", "torch" or "naive"."""
    global _warned
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("torch", "naive"):
        return backend
    compiled = compiled_backends()
    if backend == "auto":
        if device.type in compiled and device.type in AUTO_KERNELS:
            return device.type
        if _LOAD_ERROR is not None and not _warned:
            _warned = True
            warnings.warn(
                f"weightablate: the compiled extension is not available ({_LOAD_ERROR}); "
                "using the pure-PyTorch reference (same results, slower). Rebuild with "
                "`pip install --no-build-isolation -e .`",
                RuntimeWarning,
                stacklevel=3,
            )
        return "torch"
    if backend not in compiled:
        why = f"the extension failed to load: {_LOAD_ERROR}" if _LOAD_ERROR else f"compiled backends: {compiled}"
        raise RuntimeError(f"backend={backend!r} is not available ({why})")
    if device.type != backend:
        raise ValueError(f"backend={backend!r} cannot run on tensors on {device}; pass device= or backend='auto'")
    return backend


def pair_deltas(backend, a_t, z_t, rows, cols, w, gain, shift, slope):
    """d[k, n] = s(u[n, i] - gain[i] * w[k] * a[n, j]) - s(u[n, i]) in float64, (K, N).

    ``u = gain * z + shift``, ``s`` the leaky ReLU with per-unit ``slope`` (ReLU 0, identity 1),
    ``(i, j) = (rows[k], cols[k])``; a_t (J, N) and z_t (I, N) are the target's input and output,
    transposed. Exact: each side of the ReLU kink takes its own cancellation-free form.
    """
    fn = _reference.pair_deltas if backend == "torch" else torch.ops.weightablate.pair_deltas
    return fn(a_t, z_t, rows, cols, w, gain, shift, slope)


def score_deltas(backend, d, unit, head, probs, logits, labels, moments=None, moment_slot=None, flips=True,
                 by_class=False):
    """Per-weight float64 sums over samples of the rank-one correction ``l' = l + d[k, n] v``.

    ``v = head[unit[k]]`` (C,), or ``e_unit[k]`` when ``head`` is None (the target is the logits
    layer). Returns ``(delta_loss, delta_kl, flips, new_errors, new_correct, nonzero, class_loss)``,
    each (K,) but ``class_loss``: delta_loss split by label, (K, C) float64 if ``by_class`` else (K, 0):
    ``delta_loss = sum_n CE(l'_n, y_n) - CE(l_n, y_n)``, ``delta_kl = sum_n KL(p_n || p'_n)``,
    computed as ``KL = log sum_c p_c exp(d (v_c - E_p v))`` and ``dCE = KL + d (E_p v - v_y)``,
    which never subtract two losses. ``moments`` (D, M, N) with ``moment_slot`` (U,) give the raw
    moments ``sum_c p_nc v_c^k`` of some units; pairs whose truncation error is certified below
    1e-10 of their KL use them (O(D)), the rest take the exact O(C) loop.
    """
    fn = _reference.score_deltas if backend == "torch" else torch.ops.weightablate.score_deltas
    return fn(d, unit, head, probs, logits, labels, moments, moment_slot, flips, by_class)


def has_fused(backend: str) -> bool:
    """Whether ``backend`` has the fused whole-layer kernel (fused_scores)."""
    return backend in ("cpu", "cuda") and _has_kernel("fused_scores", backend.upper())


def fused_scores(backend, a_t, z_t, rows, cols, w, gain, shift, slope, head, probs, logits, labels, moments=None,
                 mean_gap=None, moment_slot=None, flips=True, by_class=False):
    """pair_deltas then score_deltas in one pass, d never stored (a piecewise or logits head).

    Same inputs as the two ops (``head`` None: the target is the logits layer) and the same seven
    outputs, plus ``exact_pairs`` and ``active_pairs`` (K,) int64: the pairs the exact O(C) loop
    scored, and the pairs with d != 0. ``moments`` (D, M, N) are about each sample's top class
    (``weightablate.fused.top_moments``), ``mean_gap`` (M, N) = E_p[v] - v_y.
    """
    fn = _fused_reference.fused_scores if backend == "torch" else torch.ops.weightablate.fused_scores
    return fn(a_t, z_t, rows, cols, w, gain, shift, slope, head, probs, logits, labels, moments, mean_gap,
              moment_slot, flips, by_class)
