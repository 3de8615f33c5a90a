"""Interest models behind one interface (see base.InterestModel) and a registry by name."""

from __future__ import annotations

from ebbtide.models.base import Batch, InterestModel
from ebbtide.models.decay_pool import DecayPool
from ebbtide.models.decay_transformer import DecayTransformer
from ebbtide.models.gru import RecurrentInterest
from ebbtide.models.long_short import LongShort

MODELS = ("decay_pool", "gru", "lstm", "decay_transformer", "long_short")


def build_model(name: str, n_items: int, n_types: int, dim: int, max_len: int, **options) -> InterestModel:
    """options: the model's constructor options (config.MODEL_OPTIONS lists them; train.model_settings sets them)."""
    if "half_lives_days" in options:
        options["half_lives_days"] = tuple(options["half_lives_days"])
    if name == "decay_pool":
        return DecayPool(n_items, dim, n_types, **options)
    if name in ("gru", "lstm"):
        return RecurrentInterest(n_items, dim, n_types, cell=name, **options)
    if name == "decay_transformer":
        return DecayTransformer(n_items, dim, n_types, max_len=max_len, **options)
    if name == "long_short":
        return LongShort(n_items, dim, n_types, **options)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


__all__ = ["MODELS", "Batch", "InterestModel", "build_model", "DecayPool", "DecayTransformer",
           "RecurrentInterest", "LongShort"]
