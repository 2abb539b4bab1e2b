"""The embedded default: scikit-learn's bundled 8x8 digits and a small ReLU MLP trained on them.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn (1797 images,
64 features, 10 classes). The MLP trains deterministically in a second or two on a CPU and is
cached as a state dict under ``$XDG_CACHE_HOME/weightablate/`` (default ``~/.cache``).
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

TEST_FRACTION = 0.3
HIDDEN = 256
N_FEATURES = 64
N_CLASSES = 10
EPOCHS = 5  # ~97.6% test accuracy; longer training drives the train loss to ~0 (overfit)
BATCH = 32
LR = 1e-3
DEFAULT_LAYER = "fc2"


def _recipe(seed: int) -> str:
    """Identifies what a cached state dict was trained with: a cache from another recipe is retrained."""
    return f"digits-mlp v1 split={TEST_FRACTION} hidden={HIDDEN} epochs={EPOCHS} batch={BATCH} lr={LR} seed={seed}"


def load_digits_split(seed: int = 0):
    """``(X_train, y_train, X_test, y_test)``: float32 (N, 64) inputs and int64 (N,) labels.

    A stratified 70/30 split drawn with ``seed``; every feature is standardised with the mean and
    standard deviation of the train split (constant features: divided by 1, so they stay 0).
    1257 train and 540 test samples.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X.astype(np.float64), y, test_size=TEST_FRACTION, stratify=y,
                                              random_state=seed)
    mean = X_tr.mean(0)
    std = X_tr.std(0)
    std[std == 0] = 1.0
    X_tr, X_te = (X_tr - mean) / std, (X_te - mean) / std
    as_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    return as_x(X_tr), as_y(y_tr), as_x(X_te), as_y(y_te)


def train_subset(X_train, y_train, n: int, seed: int = 0):
    """The first ``n`` rows of a permutation of the train split drawn with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(X_train.shape[0], generator=g)[: min(n, X_train.shape[0])]
    return X_train[idx], y_train[idx]


def digits_mlp() -> nn.Sequential:
    """The architecture (untrained): fc1 64->256, ReLU, fc2 256->256, ReLU, fc3 256->10."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(N_FEATURES, HIDDEN)),
        ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(HIDDEN, HIDDEN)),
        ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(HIDDEN, N_CLASSES)),
    ]))


def cache_path(seed: int = 0) -> Path:
    """Where ``digits_model(seed)`` keeps its state dict."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "weightablate" / f"digits_mlp_seed{int(seed)}.pt"


def train_digits_mlp(seed: int = 0, X_train=None, y_train=None) -> nn.Sequential:
    """Train ``digits_mlp()`` with Adam (one thread: the matrices are tiny, more threads only
    contend, and one thread makes the result independent of the machine's core count).
    Deterministic for a given seed and torch build; the global RNG state is left as it was."""
    if X_train is None:
        X_train, y_train, _, _ = load_digits_split(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(seed, X_train, y_train)
    finally:
        torch.set_num_threads(threads)


def _train(seed, X_train, y_train):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = digits_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        g = torch.Generator().manual_seed(int(seed))
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(EPOCHS):
            perm = torch.randperm(X_train.shape[0], generator=g)
            for s in range(0, perm.numel(), BATCH):
                idx = perm[s : s + BATCH]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(X_train[idx]), y_train[idx]).backward()
                opt.step()
    return model.eval()


def _load_cached(path: Path, model: nn.Module, seed: int) -> bool:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("recipe") != _recipe(seed):
            return False
        model.load_state_dict(saved["state_dict"])
    except Exception:  # missing, truncated, or from another architecture: retrain
        return False
    return all(torch.isfinite(p).all() for p in model.parameters())


def _save_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def digits_model(seed: int = 0, cache: bool = True, log=None) -> nn.Sequential:
    """The trained digits MLP in eval mode (~97% test accuracy).

    With ``cache`` the state dict is read from ``cache_path(seed)`` (a dict ``{"recipe": str,
    "state_dict": ...}``; ``--checkpoint`` accepts it) when present and made with the same recipe, else
    the model is trained and written there atomically (a temporary file, then ``os.replace``), so
    concurrent runs never see a half-written file. ``log``: a callable for status lines, or None.
    """
    say = log or (lambda msg: None)
    model = digits_mlp()
    path = cache_path(seed)
    if cache and path.is_file() and _load_cached(path, model, seed):
        say(f"using the cached digits MLP {path}")
        return model.eval()
    say(f"training the digits MLP (seed {seed})...")
    model = train_digits_mlp(seed)
    if cache:
        try:
            _save_atomic({"recipe": _recipe(seed), "state_dict": model.state_dict()}, path)
            say(f"cached it in {path}")
        except OSError as exc:
            print(f"weightablate: could not cache the digits MLP in {path}: {exc}", file=sys.stderr)
    return model.eval()


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())
