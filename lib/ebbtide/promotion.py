"""Model promotion: an explicit pointer to the artifact version nightly serves.

`ebbtide promote MODEL VERSION` writes ``<train.output>/<MODEL>/PROMOTED.json`` (atomically: a reader sees the
old or the new pointer, never half of one) after loading the artifact and checking its content hash. Nightly
follows the pointer; an explicit ``nightly.model_version`` overrides it, and ``nightly.follow: latest`` (the demo
only) takes the newest folder instead. The pointer file keeps a history of promotions for the audit trail.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from ebbtide.config import Config

POINTER = "PROMOTED.json"


class NoPromotedModelError(FileNotFoundError):
    """Nightly follows promotions and none was made."""


def promote(out_root: str | Path, model: str, version: str, note: str = "") -> dict:
    from ebbtide.artifacts import load_artifact

    folder = Path(out_root) / model
    path = folder / version
    if not path.is_dir():
        known = sorted(p.name for p in folder.glob("*") if p.is_dir() and not p.name.startswith(("_", ".")))
        raise FileNotFoundError(f"no artifact {path} (versions of {model}: {', '.join(known) or 'none'})")
    _, _, meta = load_artifact(path)        # refuses a damaged artifact (content hash)
    previous = _read(folder)
    entry = {"version": version, "content_hash": meta["content_hash"], "note": note,
             "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    pointer = {**entry, "history": ([{k: v for k, v in previous.items() if k != "history"}] if previous else [])
               + (previous or {}).get("history", [])[:49]}
    tmp = folder / f".{POINTER}.{os.getpid()}"
    tmp.write_text(json.dumps(pointer, indent=2))
    os.replace(tmp, folder / POINTER)
    return pointer


def promoted(out_root: str | Path, model: str) -> Path:
    pointer = _read(Path(out_root) / model)
    if not pointer:
        raise NoPromotedModelError(
            f"no promoted {model} model under {out_root}: run `ebbtide promote {model} VERSION` "
            f"(or set nightly.model_version)")
    return Path(out_root) / model / pointer["version"]


def resolve_model(cfg: Config) -> Path:
    """The artifact nightly serves: an explicit version, else the promoted one (or the newest, in the demo)."""
    from ebbtide.artifacts import latest_artifact

    n, out = cfg.nightly, cfg.train.output
    if n.model_version:
        explicit = Path(n.model_version)
        return explicit if explicit.is_absolute() or explicit.exists() else Path(out) / n.model / n.model_version
    return latest_artifact(out, n.model) if n.follow == "latest" else promoted(out, n.model)


def _read(folder: Path) -> dict | None:
    path = folder / POINTER
    return json.loads(path.read_text()) if path.exists() else None
