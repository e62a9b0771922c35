"""Knowledge-model checkpoints: every trainable parameter, verified before it is served.

A checkpoint is a folder ``<root>/<domain>/<version>/`` with

* ``model.safetensors`` - the network's state, the LM text matrix included (the vectors it was trained
  with: a trainer on a GPU and workers on CPUs serve the same ones; only an item whose catalogue text
  changed since - ``text_keys`` - is re-embedded by the worker's LM),
* ``config.json`` - architecture, the item ids the rows belong to, their graph entities,
* ``manifest.json`` - format, version, domain, SHA-256 and size of both files.

:func:`load_knowledge` refuses a checkpoint whose files are missing, oversized, altered (checksum), or
whose tensors do not match the config (shape) - the caller keeps serving what it had.
``<root>/<domain>/ACTIVE`` names the version to serve; :func:`publish` writes a checkpoint and then
moves the pointer atomically, so a reader sees the old version or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from driftrec.model.knowledge.seqrec import (
    ItemRepresentation,
    KnowledgeModel,
    KnowledgeTrainer,
    SeqRecConfig,
    SeqRecNet,
    SequenceEncoder,
    text_key,
    text_vectors,
)

FORMAT = "driftrec-knowledge/2"  # 2: the text matrix is stored
WEIGHTS, CONFIG, MANIFEST, ACTIVE = "model.safetensors", "config.json", "manifest.json", "ACTIVE"
KNOWLEDGE_SUBDIR = "knowledge"  # under model.adapter_dir: <adapter_dir>/knowledge/<domain>/<version>/
MAX_WEIGHTS_BYTES = 1024 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CheckpointRejected(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _text_digest(texts: np.ndarray | None) -> str | None:
    return None if texts is None else hashlib.sha256(np.ascontiguousarray(texts, dtype=np.float32).tobytes()).hexdigest()


def save_knowledge(trainer: KnowledgeTrainer, folder: str | os.PathLike, *, version: str, domain: str = "default") -> Path:
    """Write ``trainer``'s current network as a checkpoint folder (returned)."""
    if not _NAME.match(version) or not _NAME.match(domain):
        raise ValueError("version and domain must be names (letters, digits, '.', '_', '-')")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in trainer.net.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    config = {
        "format": FORMAT,
        "seqrec": asdict(trainer.cfg),
        "item_ids": trainer.item_ids,
        "item_entity": trainer.item_entity,
        "text": trainer.texts is not None,
        "text_sha256": _text_digest(trainer.texts),
        "text_keys": getattr(trainer, "text_keys", None),
        "text_model": trainer.model_path,
        "n_entities": int(trainer.net.items.entity.num_embeddings) if trainer.net.items.entity is not None else 0,
        "fits": trainer.fits,
    }
    (out / CONFIG).write_text(json.dumps(config))
    manifest = {"format": FORMAT, "version": version, "domain": domain, "created": time.time(),
                "files": {n: {"sha256": _sha256(out / n), "bytes": (out / n).stat().st_size} for n in (WEIGHTS, CONFIG)}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointRejected("missing_file", f"{what} missing")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointRejected("too_large", f"{what} is larger than {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointRejected("corrupt", f"{what} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointRejected("corrupt", f"{what} is not a JSON object")
    return data


def load_knowledge(folder: str | os.PathLike, items: Mapping[str, Any], model_path: str | None = None) -> KnowledgeModel:
    """Verify and load a checkpoint for serving; ``items`` (item id -> Item): the catalogue now (an item
    whose text changed since training is re-embedded by the LM at ``model_path``, default the packaged
    one). Raises :class:`CheckpointRejected` (with a reason) on anything amiss."""
    root = Path(folder)
    manifest = _read_json(root / MANIFEST, "manifest")
    if manifest.get("format") != FORMAT:
        raise CheckpointRejected("config", f"not a {FORMAT} checkpoint")
    files = manifest.get("files") or {}
    for name in (WEIGHTS, CONFIG):
        path = root / name
        meta = files.get(name) or {}
        if not path.is_file():
            raise CheckpointRejected("missing_file", f"{name} missing")
        if path.stat().st_size > (MAX_WEIGHTS_BYTES if name == WEIGHTS else MAX_JSON_BYTES):
            raise CheckpointRejected("too_large", f"{name} is too large")
        if meta.get("sha256") != _sha256(path):
            raise CheckpointRejected("checksum", f"{name} does not match its checksum")
    config = _read_json(root / CONFIG, "config")
    try:
        cfg = SeqRecConfig(**config["seqrec"])
        item_ids = list(config["item_ids"])
        item_entity = {str(k): int(v) for k, v in (config.get("item_entity") or {}).items()}
        n_entities = int(config.get("n_entities") or 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointRejected("config", f"config is invalid: {exc}") from None
    try:
        state = load_file(str(root / WEIGHTS))
    except Exception as exc:  # noqa: BLE001 - a damaged file of any kind
        raise CheckpointRejected("corrupt", f"weights unreadable: {exc}") from None
    texts = _texts(config, state, item_ids, items, model_path) if config.get("text") else None
    ie = None
    if n_entities:
        ie = np.full(len(item_ids), -1, dtype=np.int64)
        for n, i in enumerate(item_ids):
            ie[n] = item_entity.get(i, -1)
    rep = ItemRepresentation(len(item_ids), cfg, text=texts, item_entity=ie, n_entities=max(n_entities, 1))
    net = SeqRecNet(rep, SequenceEncoder(cfg))
    expected = {k: v.shape for k, v in net.state_dict().items()}
    if set(state) != set(expected) or any(tuple(state[k].shape) != tuple(s) for k, s in expected.items()):
        raise CheckpointRejected("shape", "the weights do not match the configured architecture")
    if texts is not None:
        state["items.text"] = torch.as_tensor(texts)
    net.load_state_dict(state)
    return KnowledgeModel(net, item_ids, texts, f"{manifest.get('domain', 'default')}/{manifest.get('version')}",
                          item_entity=item_entity, model_path=model_path)


def _texts(config: dict, state: dict, item_ids: list[str], items: Mapping[str, Any], model_path: str | None) -> np.ndarray:
    """The text matrix the checkpoint was trained with (its digest checked), with the rows of items whose
    catalogue text changed since re-embedded by this process's LM."""
    stored = state.get("items.text")
    if stored is None or tuple(stored.shape[:1]) != (len(item_ids),):
        raise CheckpointRejected("shape", "the text matrix is missing or does not match the item list")
    texts = stored.float().numpy().copy()
    if _text_digest(texts) != config.get("text_sha256"):
        raise CheckpointRejected("config", "the text matrix does not match its digest")
    keys = config.get("text_keys")
    if isinstance(keys, list) and len(keys) == len(item_ids):
        changed = [n for n, i in enumerate(item_ids) if i in items and text_key(items[i].text()) != keys[n]]
        if changed:
            texts[changed] = text_vectors([items[item_ids[n]].text() for n in changed], model_path)
    return texts


def publish(trainer: KnowledgeTrainer, root: str | os.PathLike, version: str, domain: str = "default", *,
            keep_versions: int = 0) -> Path:
    """Save a checkpoint under ``root/domain/version`` and make it the active one (atomic pointer); then
    delete the versions older than the newest ``keep_versions`` (0 = keep all; see :func:`prune`)."""
    folder = save_knowledge(trainer, Path(root) / domain / version, version=version, domain=domain)
    pointer = Path(root) / domain / ACTIVE
    tmp = pointer.with_name(f".{ACTIVE}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(version)
    os.replace(tmp, pointer)
    prune(root, domain, keep_versions)
    return folder


def prune(root: str | os.PathLike, domain: str, keep: int) -> list[str]:
    """Delete the ``kNNNN`` versions of ``domain`` older than its newest ``keep`` (0 = keep all), never the
    active one; a version is renamed into a hidden folder first, so no reader sees it half deleted.
    (A worker serving an older version holds it in memory: nothing it serves is read from disk again.)"""
    if keep <= 0:
        return []
    folder = Path(root) / domain
    if not folder.is_dir():
        return []
    numbered = sorted((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _VERSION.match(p.name)))
    active = active_version(root, domain)
    removed = []
    for _, path in numbered[:-keep]:
        if path.name == active:
            continue
        trash = folder / f".pruned-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path.name)
    return removed


def knowledge_root(adapter_dir: str | os.PathLike) -> Path:
    """Where the knowledge models of every domain live, under ``model.adapter_dir``."""
    return Path(adapter_dir) / KNOWLEDGE_SUBDIR


_VERSION = re.compile(r"^k(\d+)$")


def next_version(root: str | os.PathLike, domain: str = "default") -> str:
    """``k0001``, ``k0002``, ... numbered after the highest version folder of ``domain``."""
    folder = Path(root) / domain
    numbers = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else ()) if (m := _VERSION.match(p.name))]
    return f"k{max(numbers, default=0) + 1:04d}"


def active_version(root: str | os.PathLike, domain: str = "default") -> str | None:
    pointer = Path(root) / domain / ACTIVE
    try:
        version = pointer.read_text().strip()
    except OSError:
        return None
    return version if _NAME.match(version) else None
