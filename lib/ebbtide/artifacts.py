"""Model artifacts: written by training, read by evaluation and the nightly job.

``<train.output>/<model>/<version>/`` holds ``weights.pt`` (a state dict, loaded with ``weights_only=True``),
``config.json`` (what rebuilds the model: name, sizes, model options, event types, training settings) and
``meta.json`` (data snapshot and vocabulary versions, split, learned decay, training metrics and a content hash
of the other two files, checked on load).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from ebbtide.models import InterestModel, build_model


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    with open(folder / "weights.pt", "rb") as fh:     # in pieces: weights can be GBs (a 10M-item table)
        while piece := fh.read(1 << 24):
            digest.update(piece)
    digest.update((folder / "config.json").read_bytes())
    return digest.hexdigest()


def write_artifact(out_root: str | Path, model: InterestModel, model_conf: dict, meta: dict) -> Path:
    """Write into a staging folder, then rename: a reader never sees a half-written artifact."""
    out_root = Path(out_root)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    staging = out_root / model.name / f".staging-{os.getpid()}-{time.time_ns()}"
    staging.mkdir(parents=True)
    torch.save(weights, staging / "weights.pt")
    (staging / "config.json").write_text(json.dumps(model_conf, indent=2, sort_keys=True, default=str))
    meta = dict(meta, content_hash=_digest(staging))
    (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    version = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{meta['content_hash'][:8]}"
    final = out_root / model.name / version
    os.replace(staging, final)
    return final


def build_from_config(model_conf: dict) -> InterestModel:
    return build_model(model_conf["name"], model_conf["n_items"], model_conf["n_types"], model_conf["dim"],
                       model_conf["max_len"], **model_conf.get("options", {}))


def load_artifact(path: str | Path, mmap: bool = False) -> tuple[InterestModel, dict, dict]:
    """Rebuild a model from its artifact; weights load with weights_only=True (no pickled code).

    mmap=True maps weights.pt instead of reading it, and the model's parameters *are* the mapped tensors
    (assign=True): every process on a host that maps the same file shares one copy of the item table through
    the page cache (read-only use: inference). A file system that cannot map falls back to reading."""
    path = Path(path)
    model_conf = json.loads((path / "config.json").read_text())
    meta = json.loads((path / "meta.json").read_text())
    if _digest(path) != meta["content_hash"]:
        raise ValueError(f"artifact {path} does not match its content hash: refusing to load")
    model = build_from_config(model_conf)
    try:
        weights = torch.load(path / "weights.pt", map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, RuntimeError):
        if not mmap:
            raise
        weights = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(weights, assign=mmap)
    model.eval()
    return model, model_conf, meta


def latest_artifact(out_root: str | Path, name: str) -> Path:
    versions = sorted(p for p in (Path(out_root) / name).glob("*") if p.is_dir() and not p.name.startswith("."))
    if not versions:
        raise FileNotFoundError(f"no trained {name} model under {out_root}")
    return versions[-1]
