"""AblationResult: what one ablation sweep measured, and its save/load round trip."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

import numpy as np
import torch

_TENSORS = ("indices", "rows", "cols", "weight", "delta_loss", "delta_kl", "flips", "new_errors",
            "new_correct", "exact_zero", "class_loss")


@dataclass
class AblationResult:
    """The effect of zeroing each selected weight, alone, over the whole dataset.

    Tensors, each (K,) on the CPU: ``indices`` (int64 flat index into ``layer.weight``),
    ``rows``/``cols``, ``weight`` (the original values), ``delta_loss`` (float64,
    ``sum_n CE_n(ablated) - CE_n(base)``: positive = the weight helps), ``delta_kl`` (float64,
    ``sum_n KL(p_n || p'_n)``), ``flips``/``new_errors``/``new_correct`` (int64 prediction
    changes), ``exact_zero`` (bool: zeroing changes no sample's logits at all); with
    ``by_class=True`` also ``class_loss`` (K, C) float64, delta_loss split by the samples' label
    (its rows sum to delta_loss). Metrics not asked for are None.
    """

    indices: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    weight: torch.Tensor
    delta_loss: torch.Tensor | None
    delta_kl: torch.Tensor | None
    flips: torch.Tensor | None
    new_errors: torch.Tensor | None
    new_correct: torch.Tensor | None
    exact_zero: torch.Tensor
    n_samples: int
    base_loss: float  # mean cross-entropy over the dataset
    base_accuracy: float
    class_loss: torch.Tensor | None = None  # (K, C) float64: delta_loss split by label (by_class=True)
    layer: str = ""
    layer_shape: tuple[int, int] = (0, 0)  # the 2-D view rows/cols index: (out units, entries per unit)
    param: str = "weight"  # which parameter the indices refer to: "weight" or "bias" (rows = entry, cols = 0)
    method: str = ""  # which exact path ran: "logits", "piecewise", "elementwise", "funnel", "replay" or "naive"
    head: str = ""  # what the method saw after the layer
    backend: str = ""
    mode: str = ""
    precision: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def delta_loss_mean(self) -> torch.Tensor | None:
        """delta_loss per sample: the change of the dataset's mean cross-entropy."""
        return None if self.delta_loss is None else self.delta_loss / self.n_samples

    def __len__(self) -> int:
        return self.indices.numel()

    def __repr__(self) -> str:
        return (f"AblationResult({len(self)} weights of {self.layer!r} {tuple(self.layer_shape)}, "
                f"{self.n_samples} samples, method={self.method!r}, backend={self.backend!r}, "
                f"base_loss={self.base_loss:.6g}, base_accuracy={self.base_accuracy:.4f})")

    def to_dataframe(self):
        """One row per weight (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        cols = {name: getattr(self, name).numpy() for name in _TENSORS
                if getattr(self, name) is not None and name != "class_loss"}
        if self.delta_loss is not None:
            cols["delta_loss_mean"] = self.delta_loss_mean.numpy()
        return pd.DataFrame(cols)

    def save(self, path) -> None:
        """Write an .npz file; ``weightablate.load`` returns a bit-identical result."""
        arrays = {name: getattr(self, name).numpy() for name in _TENSORS if getattr(self, name) is not None}
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _TENSORS}
        with open(path, "wb") as fh:  # a file handle: numpy adds no ".npz" suffix of its own
            np.savez(fh, __meta__=np.array(json.dumps(meta)), **arrays)


def load(path) -> AblationResult:
    """Read a result written by ``AblationResult.save``."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        tensors = {name: (torch.from_numpy(z[name].copy()) if name in z.files else None) for name in _TENSORS}
    meta["layer_shape"] = tuple(meta["layer_shape"])
    return AblationResult(**tensors, **meta)
