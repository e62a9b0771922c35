"""LoRA adapters: creating, saving, verifying and loading versioned checkpoints, and the registry.

Layout: ``<adapter_dir>/<domain>/<version>/`` holds exactly

* ``adapter_model.safetensors`` - the LoRA tensors (PEFT state-dict names), safetensors only;
* ``adapter_config.json`` - the LoRA hyper-parameters (r, alpha, dropout, target modules);
* ``manifest.json`` - version, domain, base model (path, name, fingerprint of its config), LoRA
  config, training window, metrics, sha256 of the safetensors file, created_at.

A checkpoint is written to a hidden temporary folder and renamed into place, so a reader (the
scorer's directory watcher) never sees a half-written one.

:func:`verify_checkpoint` refuses (raises :class:`CheckpointError`) a path outside the adapter dir
(``..``, absolute elsewhere, symlinks anywhere), a missing/invalid manifest or config, any pickle-
capable or unexpected file, a checksum mismatch, an unreadable safetensors file, and a base-model
fingerprint mismatch. :func:`apply_checkpoint` additionally refuses tensors whose names or shapes do
not match the LoRA layout of the running base model (e.g. another ``r`` or another hidden size).
Nothing here ever calls ``torch.load``.

The trainer creates its model with :func:`create_lora_model` and saves with :func:`save_checkpoint`,
so trainer and scorer always agree on the LoRA layout.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
MANIFEST_NAME = "manifest.json"
STATE_NAME = "_registry.json"
MANIFEST_FORMAT = "driftrec-lora/1"
ALLOWED_FILES = frozenset({WEIGHTS_NAME, CONFIG_NAME, MANIFEST_NAME, "README.md"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
MAX_WEIGHTS_BYTES = 512 * 1024 * 1024
MAX_JSON_BYTES = 1024 * 1024
BASE_VERSION = "base"  # the adapter version reported when a domain serves the bare base model
RESERVED_VERSIONS = frozenset({BASE_VERSION})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Target-module candidates, tried in order; the first set whose names all occur among the model's
# Linear/Conv1D leaves wins. Covers BERT-likes, DistilBERT, GPT-2, llama/mistral/qwen/opt-style
# decoders, falcon/bloom/neox and MPNet.
TARGET_MODULE_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("query", "value"),
    ("q_proj", "v_proj"),
    ("q_lin", "v_lin"),
    ("c_attn",),
    ("query_key_value",),
    ("Wqkv",),
    ("qkv_proj",),
    ("q", "v"),
)

# Config fields that define tensor shapes; their hash is the base-model fingerprint.
_FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


class CheckpointError(Exception):
    """A checkpoint was refused. ``reason`` is a small fixed label (for the rejection metric)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_ABS_PATH_RE = re.compile(r"(?<![\w.<>])/(?:[^\s'\":,;()/]+/)*([^\s'\":,;()/]*)")


def public_message(message: str, adapter_dir: str | os.PathLike) -> str:
    """``message`` fit for an unauthenticated reader: paths under ``adapter_dir`` relative to it, any
    other absolute path reduced to its last part (no layout of the host leaks through ``/v1/adapters``)."""
    root = Path(adapter_dir)
    for prefix in {str(root.resolve()), str(root.absolute()), str(root)}:
        if prefix not in ("", ".", "/"):
            message = message.replace(prefix.rstrip("/") + "/", "<adapter_dir>/").replace(prefix, "<adapter_dir>")
    return _ABS_PATH_RE.sub(lambda m: f"<path>/{m.group(1)}", message)


def valid_name(name: str) -> bool:
    """Domain and version names: letters, digits, '.', '_', '-', not starting with a dot."""
    return isinstance(name, str) and bool(_NAME_RE.match(name)) and ".." not in name


# ----------------------------------------------------------------------------------- base model


def base_fingerprint(config: Any) -> str:
    """Short sha256 over the shape-defining fields of a transformers config (or a dict of one)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    picked = {k: data[k] for k in _FINGERPRINT_KEYS if k in data and data[k] is not None}
    blob = json.dumps(picked, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_model_name(model_or_path: Any) -> str:
    """A readable base-model name: the folder name (with its parent when the folder is a generic 'model')."""
    path = getattr(getattr(model_or_path, "config", None), "_name_or_path", None) or str(model_or_path)
    p = Path(str(path).rstrip("/"))
    if p.name.lower() in {"model", "models", "weights", "snapshot", "base"} and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name or str(path)


def find_target_modules(model: torch.nn.Module) -> list[str]:
    """The LoRA target module names for ``model`` (attention query/value projections)."""
    leaves: set[str] = set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear) or kind == "Conv1D":
            leaves.add(name.rsplit(".", 1)[-1])
    for candidate in TARGET_MODULE_CANDIDATES:
        if all(c in leaves for c in candidate):
            return list(candidate)
    raise ValueError(
        f"cannot find LoRA target modules for {type(model).__name__}; linear layers: {sorted(leaves)[:20]}"
    )


def lora_config(
    model: torch.nn.Module,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
):
    from peft import LoraConfig

    targets = target_modules or find_target_modules(model)
    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in model.modules())
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
    )


def create_lora_model(
    base_model: torch.nn.Module | None = None,
    settings: Any = None,
    *,
    init_from: str | os.PathLike | None = None,
    adapter_dir: str | os.PathLike | None = None,
    copy_base: bool = True,
    r: int | None = None,
    alpha: int | None = None,
    dropout: float | None = None,
):
    """A fresh trainable PEFT LoRA model around the base encoder (the trainer's entry point).

    ``settings`` is a :class:`driftrec.core.settings.Settings` (LoRA r/alpha/dropout, model path, device);
    ``base_model`` defaults to ``driftrec.model.lm.load_encoder`` on the settings' model path and device. With
    ``init_from`` (a checkpoint folder inside ``adapter_dir``), the LoRA weights start from that
    verified checkpoint (e.g. another domain's active adapter) instead of PEFT's zero-B init.
    """
    from peft import get_peft_model

    ms = getattr(settings, "model", None)
    if base_model is None:
        from driftrec.model.lm import choose_device, load_encoder

        plan = choose_device(ms.device if ms else "auto", ms.dtype if ms else "auto") if ms else None
        base_model = load_encoder(ms.model_path if ms else None, plan)
        copy_base = False
    if init_from is not None:
        adir = adapter_dir if adapter_dir is not None else (ms.adapter_dir if ms else None)
        if adir is None:
            raise ValueError("init_from needs adapter_dir (or settings)")
        ckpt = verify_checkpoint(init_from, adir, base_fingerprint=base_fingerprint(base_model.config))
        model = apply_checkpoint(base_model, ckpt, merge=False, copy_base=copy_base)
        for name, param in model.named_parameters():
            param.requires_grad = "lora_" in name
        return model
    cfg = lora_config(
        base_model,
        r=r if r is not None else (ms.lora_r if ms else 8),
        alpha=alpha if alpha is not None else (ms.lora_alpha if ms else 16),
        dropout=dropout if dropout is not None else (ms.lora_dropout if ms else 0.05),
    )
    return get_peft_model(copy.deepcopy(base_model) if copy_base else base_model, cfg)


# ------------------------------------------------------------------------------------- saving


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _lora_config_dict(peft_model) -> dict[str, Any]:
    cfg = peft_model.peft_config["default"]
    return {
        "peft_type": "LORA",
        "r": int(cfg.r),
        "lora_alpha": int(cfg.lora_alpha),
        "lora_dropout": float(cfg.lora_dropout),
        "target_modules": sorted(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": bool(cfg.fan_in_fan_out),
    }


def save_checkpoint(
    peft_model,
    adapter_dir: str | os.PathLike,
    domain: str,
    version: str,
    manifest_extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``peft_model``'s LoRA weights as ``<adapter_dir>/<domain>/<version>/`` and return that path.

    ``manifest_extra`` may hold ``training_window`` (e.g. {"start": t0, "end": t1, "events": n}),
    ``metrics`` (e.g. {"hr@10": 0.31}), ``parent`` (the version it was trained from) and any other
    JSON-serialisable fields. Refuses to overwrite an existing version.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not valid_name(domain) or not valid_name(version) or version in RESERVED_VERSIONS:
        raise ValueError(f"invalid domain/version name {domain!r}/{version!r}")
    root = Path(adapter_dir)
    final = root / domain / version
    if final.exists():
        raise FileExistsError(f"adapter checkpoint {final} already exists")
    (root / domain).mkdir(parents=True, exist_ok=True)
    tmp = root / domain / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in get_peft_model_state_dict(peft_model).items()
        }
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        lcfg = _lora_config_dict(peft_model)
        (tmp / CONFIG_NAME).write_text(json.dumps(lcfg, indent=2, sort_keys=True))
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        extra = dict(manifest_extra or {})
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": version,
            "domain": domain,
            "base_model": {
                "path": str(getattr(base.config, "_name_or_path", "")),
                "name": base_model_name(base),
                "fingerprint": base_fingerprint(base.config),
            },
            "lora": lcfg,
            "training_window": extra.pop("training_window", None),
            "metrics": extra.pop("metrics", {}),
            "sha256": _sha256(tmp / WEIGHTS_NAME),
            "created_at": time.time(),
        }
        for key, value in extra.items():
            manifest.setdefault(key, value)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved adapter checkpoint %s (domain=%s version=%s)", final, domain, version)
    return final


# ---------------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: its manifest, LoRA config and tensors (on CPU)."""

    path: Path
    domain: str
    version: str
    manifest: dict[str, Any]
    lora: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)


def safe_checkpoint_path(path: str | os.PathLike, adapter_dir: str | os.PathLike) -> Path:
    """Resolve ``path`` (absolute, or relative to ``adapter_dir``) and refuse anything outside it."""
    root = Path(adapter_dir).resolve()
    raw = Path(path)
    if ".." in raw.parts:
        raise CheckpointError("untrusted", f"checkpoint path {str(path)!r} contains '..'")
    candidate = raw if raw.is_absolute() else root / raw
    # No symlink anywhere between the adapter dir and the checkpoint (nor inside it, checked later).
    rel = None
    for base in (root, Path(adapter_dir).absolute()):
        try:
            rel = candidate.absolute().relative_to(base)
            break
        except ValueError:
            continue
    if rel is None:
        raise CheckpointError("untrusted", f"checkpoint path {str(path)!r} is outside the adapter dir {root}")
    cur = root
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            raise CheckpointError("untrusted", f"checkpoint path {str(path)!r} goes through symlink {cur}")
    resolved = candidate.resolve()
    if resolved != root and root not in resolved.parents:
        raise CheckpointError("untrusted", f"checkpoint path {str(path)!r} resolves outside the adapter dir")
    if len(rel.parts) != 2:
        raise CheckpointError("untrusted", f"checkpoint path {str(path)!r} is not <adapter_dir>/<domain>/<version>")
    if not resolved.is_dir():
        raise CheckpointError("missing_file", f"checkpoint {resolved} does not exist")
    return resolved


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError("missing_file", f"{what} {path.name} missing in {path.parent}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError("too_large", f"{what} {path} is too large")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError("config", f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError("config", f"{what} {path} is not a JSON object")
    return data


def verify_checkpoint(
    path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    *,
    base_fingerprint: str | None = None,
    load_tensors: bool = True,
) -> Checkpoint:
    """Check a checkpoint folder without touching any model; raise :class:`CheckpointError` if unsafe."""
    ckpt_dir = safe_checkpoint_path(path, adapter_dir)
    for entry in ckpt_dir.iterdir():
        if entry.is_symlink():
            raise CheckpointError("untrusted", f"checkpoint {ckpt_dir} contains a symlink {entry.name}")
        if entry.name.endswith(PICKLE_SUFFIXES) or entry.name in ("pytorch_model.bin", "adapter_model.bin"):
            raise CheckpointError("untrusted", f"checkpoint {ckpt_dir} contains pickle-capable file {entry.name}")
        if entry.name not in ALLOWED_FILES or not entry.is_file():
            raise CheckpointError("untrusted", f"checkpoint {ckpt_dir} contains unexpected entry {entry.name}")
    manifest = _read_json(ckpt_dir / MANIFEST_NAME, "manifest")
    lora = _read_json(ckpt_dir / CONFIG_NAME, "adapter config")
    domain, version = ckpt_dir.parent.name, ckpt_dir.name
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError("config", f"manifest {ckpt_dir} has format {manifest.get('format')!r}")
    if manifest.get("version") != version or manifest.get("domain") != domain:
        raise CheckpointError(
            "config",
            f"manifest {ckpt_dir} names {manifest.get('domain')!r}/{manifest.get('version')!r}, folder is {domain}/{version}",
        )
    sha = manifest.get("sha256")
    base = manifest.get("base_model")
    if not isinstance(sha, str) or len(sha) != 64 or not isinstance(base, dict):
        raise CheckpointError("config", f"manifest {ckpt_dir} lacks sha256/base_model")
    if base_fingerprint is not None and base.get("fingerprint") != base_fingerprint:
        raise CheckpointError(
            "shape",
            f"checkpoint {ckpt_dir} was trained on base {base.get('name')!r} fingerprint "
            f"{base.get('fingerprint')!r}, serving base has {base_fingerprint!r}",
        )
    if lora.get("peft_type") != "LORA":
        raise CheckpointError("config", f"adapter config {ckpt_dir} is not LoRA")
    r, alpha = lora.get("r"), lora.get("lora_alpha")
    targets = lora.get("target_modules")
    if (
        not isinstance(r, int) or not 1 <= r <= 1024
        or not isinstance(alpha, (int, float)) or alpha <= 0
        or not isinstance(targets, list) or not targets
        or not all(isinstance(t, str) and re.match(r"^[A-Za-z0-9_.]+$", t) for t in targets)
    ):
        raise CheckpointError("config", f"adapter config {ckpt_dir} has invalid r/lora_alpha/target_modules")
    weights = ckpt_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError("missing_file", f"{WEIGHTS_NAME} missing in {ckpt_dir}")
    if weights.stat().st_size > MAX_WEIGHTS_BYTES:
        raise CheckpointError("too_large", f"{weights} is larger than {MAX_WEIGHTS_BYTES} bytes")
    if _sha256(weights) != sha:
        raise CheckpointError("checksum", f"checksum mismatch for {weights}")
    tensors: dict[str, torch.Tensor] = {}
    if load_tensors:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(weights.read_bytes())
        except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
            raise CheckpointError("corrupt", f"{weights} is not a readable safetensors file: {exc}") from None
        if not tensors:
            raise CheckpointError("corrupt", f"{weights} holds no tensors")
        for name, t in tensors.items():
            if "lora_A" not in name and "lora_B" not in name:
                raise CheckpointError("shape", f"{weights}: unexpected tensor {name}")
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise CheckpointError("corrupt", f"{weights}: tensor {name} is not finite floating point")
            rank_dim = t.shape[0] if "lora_A" in name else t.shape[-1]
            if t.dim() != 2 or rank_dim != r:
                raise CheckpointError("shape", f"{weights}: tensor {name} {tuple(t.shape)} does not match r={r}")
    return Checkpoint(ckpt_dir, domain, version, manifest, lora, tensors)


def apply_checkpoint(base_model: torch.nn.Module, ckpt: Checkpoint, *, merge: bool = True, copy_base: bool = True):
    """A model = base + the checkpoint's LoRA (merged into plain weights when ``merge``).

    The base is deep-copied unless ``copy_base=False``. Raises :class:`CheckpointError` when the tensor
    names or shapes do not match the LoRA layout on this base model.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    lcfg = ckpt.lora
    cfg = LoraConfig(
        r=int(lcfg["r"]),
        lora_alpha=lcfg["lora_alpha"],
        lora_dropout=float(lcfg.get("lora_dropout", 0.0)),
        target_modules=list(lcfg["target_modules"]),
        bias="none",
        fan_in_fan_out=bool(lcfg.get("fan_in_fan_out", False)),
    )
    model = copy.deepcopy(base_model) if copy_base else base_model
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as exc:
        raise CheckpointError("shape", f"checkpoint {ckpt.path} targets modules absent from the base: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    got = {k: tuple(v.shape) for k, v in ckpt.tensors.items()}
    if expected.keys() != got.keys():
        missing = sorted(expected.keys() - got.keys())[:3]
        extra = sorted(got.keys() - expected.keys())[:3]
        raise CheckpointError("shape", f"checkpoint {ckpt.path} tensor names do not fit the base (missing {missing}, extra {extra})")
    bad = [k for k in expected if expected[k] != got[k]]
    if bad:
        raise CheckpointError(
            "shape", f"checkpoint {ckpt.path} tensor {bad[0]} has shape {got[bad[0]]}, base needs {expected[bad[0]]}"
        )
    dtype = next(model.parameters()).dtype
    set_peft_model_state_dict(peft_model, {k: v.to(dtype) for k, v in ckpt.tensors.items()})
    peft_model.eval()
    if merge:
        return peft_model.merge_and_unload().eval()
    return peft_model


def load_checkpoint(
    path: str | os.PathLike, adapter_dir: str | os.PathLike, base_model: torch.nn.Module, *, merge: bool = True
):
    """Verify the checkpoint at ``path`` against ``base_model`` and return (model, checkpoint)."""
    ckpt = verify_checkpoint(path, adapter_dir, base_fingerprint=base_fingerprint(base_model.config))
    return apply_checkpoint(base_model, ckpt, merge=merge), ckpt


# ----------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class VersionEntry:
    domain: str
    version: str
    path: Path
    created_at: float
    metrics: dict[str, Any]


class AdapterRegistry:
    """Versions per domain on disk, plus which one is active and the history for rollback.

    One adapter line per domain. The active/previous state is kept in
    ``<adapter_dir>/<domain>/_registry.json`` (written atomically) so a restarted scorer resumes
    the same version. A new domain starts from the base model (no versions) or, via
    :meth:`start_domain`, from a copy of another domain's active checkpoint.
    """

    def __init__(self, adapter_dir: str | os.PathLike) -> None:
        self.adapter_dir = Path(adapter_dir)
        self._lock = threading.RLock()
        self._state: dict[str, dict[str, Any]] = {}

    def path_for(self, domain: str, version: str) -> Path:
        if not valid_name(domain) or not valid_name(version):
            raise CheckpointError("untrusted", f"invalid domain/version name {domain!r}/{version!r}")
        return self.adapter_dir / domain / version

    def domains(self) -> list[str]:
        if not self.adapter_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.adapter_dir.iterdir() if p.is_dir() and not p.is_symlink() and valid_name(p.name)
        )

    def versions(self, domain: str) -> list[VersionEntry]:
        """Versions with a readable manifest, oldest first (by created_at, then name)."""
        ddir = self.adapter_dir / domain
        if not valid_name(domain) or not ddir.is_dir() or ddir.is_symlink():
            return []
        out = []
        for p in ddir.iterdir():
            if not p.is_dir() or not valid_name(p.name):
                continue
            try:
                m = _read_json(p / MANIFEST_NAME, "manifest")  # size-capped
                created = float(m.get("created_at", 0.0))
                metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
            except (OSError, ValueError, TypeError, AttributeError, CheckpointError):
                created, metrics = 0.0, {}
            out.append(VersionEntry(domain, p.name, p, created, metrics))
        out.sort(key=lambda e: (e.created_at, e.version))
        return out

    def latest(self, domain: str) -> VersionEntry | None:
        vs = self.versions(domain)
        return vs[-1] if vs else None

    # -- active / previous -----------------------------------------------------------------------
    def _load_state(self, domain: str) -> dict[str, Any]:
        with self._lock:
            if domain not in self._state:
                state: dict[str, Any] = {"active": None, "history": []}
                try:
                    raw = json.loads((self.adapter_dir / domain / STATE_NAME).read_text())
                    if isinstance(raw, dict):
                        state["active"] = raw.get("active") if isinstance(raw.get("active"), str) else None
                        state["history"] = [h for h in raw.get("history", []) if isinstance(h, str)]
                except (OSError, ValueError):
                    pass
                self._state[domain] = state
            return self._state[domain]

    def _save_state(self, domain: str, state: dict[str, Any]) -> None:
        """Persist ``state`` as the domain's registry state, then adopt it (on failure nothing changes)."""
        ddir = self.adapter_dir / domain
        tmp = ddir / f".{STATE_NAME}.{uuid.uuid4().hex[:6]}"
        try:
            ddir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(state))
            os.replace(tmp, ddir / STATE_NAME)
            self._state[domain] = state
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                # a replica with a read-only adapter mount: the state lives in memory (the trainer owns the file)
                log.warning("cannot persist adapter registry state for %s (read-only): %s", domain, exc)
                self._state[domain] = state
                return
            # disk full, I/O error...: the change must not look durable when it is not
            log.error("could not persist adapter registry state for %s: %s", domain, exc)
            raise

    def active(self, domain: str) -> str | None:
        return self._load_state(domain)["active"]

    def previous(self, domain: str) -> str | None:
        hist = self._load_state(domain)["history"]
        return hist[-1] if hist else None

    def mark_active(self, domain: str, version: str | None) -> None:
        """Record ``version`` as active; the old active version becomes the rollback target."""
        with self._lock:
            st = self._load_state(domain)
            if st["active"] == version:
                return
            history = (st["history"] + [st["active"]])[-20:] if st["active"] is not None else list(st["history"])
            self._save_state(domain, {"active": version, "history": history})

    def mark_rolled_back(self, domain: str) -> str | None:
        """Pop the rollback target and make it active; returns it (None = nothing to roll back to)."""
        with self._lock:
            st = self._load_state(domain)
            if not st["history"]:
                return None
            history = list(st["history"])
            target = history.pop()
            self._save_state(domain, {"active": target, "history": history})
            return target

    def prune(self, domain: str, keep: int) -> list[str]:
        """Delete the versions of ``domain`` older than its newest ``keep`` (0 = keep all); the active
        version and every rollback target stay whatever their age. Returns the removed versions.

        A version leaves by a rename into a hidden folder first, so no reader sees it half deleted."""
        if keep <= 0:
            return []
        with self._lock:
            st = self._load_state(domain)
            protected = {st["active"], *st["history"]}
            entries = self.versions(domain)
            removed = []
            for e in entries[:-keep]:
                if e.version in protected:
                    continue
                trash = e.path.parent / f".pruned-{e.version}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(e.path, trash)
                except OSError as exc:
                    log.warning("could not prune adapter %s/%s: %s", domain, e.version, exc)
                    continue
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(e.version)
        if removed:
            log.info("pruned %d old adapter version(s) of %s: %s", len(removed), domain, ", ".join(removed))
        return removed

    def describe(self, domain: str) -> dict[str, Any]:
        return {
            "domain": domain,
            "active": self.active(domain),
            "previous": self.previous(domain),
            "versions": [
                {"version": e.version, "created_at": e.created_at, "metrics": e.metrics} for e in self.versions(domain)
            ],
        }

    def start_domain(self, new_domain: str, from_domain: str, version: str | None = None) -> Path:
        """Seed ``new_domain`` with a copy of ``from_domain``'s active (else latest) checkpoint."""
        src_version = self.active(from_domain) or (self.latest(from_domain).version if self.latest(from_domain) else None)
        if src_version is None:
            raise ValueError(f"domain {from_domain!r} has no adapter to start {new_domain!r} from")
        if src_version in RESERVED_VERSIONS:  # the scorer marks a domain serving the bare base model as "base"
            raise ValueError(f"domain {from_domain!r} serves the base model (no adapter) to start {new_domain!r} from; "
                             f"a new domain without a seed serves the base model anyway")
        src = verify_checkpoint(self.path_for(from_domain, src_version), self.adapter_dir, load_tensors=False)
        version = version or f"from-{from_domain}-{src_version}"
        dest = self.path_for(new_domain, version)
        if dest.exists():
            raise FileExistsError(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            shutil.copyfile(src.path / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
            shutil.copyfile(src.path / CONFIG_NAME, tmp / CONFIG_NAME)
            manifest = dict(src.manifest)
            manifest.update(
                version=version, domain=new_domain, parent={"domain": from_domain, "version": src_version},
                created_at=time.time(),
            )
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest
