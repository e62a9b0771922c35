"""Shared helpers for the scorer/adapter tests (tiny catalogue, adapters that differ, references)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from driftrec.core.settings import Settings
from driftrec.model.adapters import create_lora_model, save_checkpoint
from driftrec.model.base import HistoryEntry, UserContext
from driftrec.model.lm import DevicePlan, embed_texts, load_encoder, load_tokenizer
from driftrec.model.text import render_history
from driftrec.core.contracts import Item

ADMIN_TOKEN = "test-admin-token"
MAX_LENGTH = 32

_GENRES = ["action", "comedy", "drama", "sci-fi", "romance", "horror", "animation", "crime", "documentary"]
_WORDS = ["star", "night", "river", "ghost", "city", "dream", "iron", "summer", "shadow", "garden", "storm", "glass"]


def make_items(n: int = 30, domain: str = "default", seed: int = 0, prefix: str = "i") -> list[Item]:
    rng = random.Random(seed)
    items = []
    for k in range(n):
        title = " ".join(rng.sample(_WORDS, 2)).title()
        items.append(
            Item(
                event_id=f"e{prefix}{k}",
                event_time=1.7e9,
                item_id=f"{prefix}{k}",
                title=title,
                genres=rng.sample(_GENRES, 2),
                year=1970 + rng.randrange(55),
                tags=[rng.choice(_WORDS)],
                domain=domain,
            )
        )
    return items


def make_settings(adapter_dir: Path, **scorer: object) -> Settings:
    return Settings(
        model={"adapter_dir": str(adapter_dir), "device": "cpu", "dtype": "float32", "max_length": MAX_LENGTH},
        scorer={"admin_token": ADMIN_TOKEN, "watch_interval_s": 0.2, **scorer},
    )


_BASE: dict[str, object] = {}


def base_model_and_tokenizer():
    """The default base model (float32, CPU) and tokenizer, loaded once per test process."""
    if not _BASE:
        _BASE["model"] = load_encoder(None, DevicePlan(torch.device("cpu"), torch.float32))
        _BASE["tok"] = load_tokenizer(None)
    return _BASE["model"], _BASE["tok"]


def make_adapter(base, adapter_dir: Path, domain: str, version: str, seed: int, r: int = 4, scale: float = 0.3):
    """Save a LoRA checkpoint whose B matrices are random (so it changes scores); returns (path, peft)."""
    peft_model = create_lora_model(base, r=r, alpha=2 * r, dropout=0.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.eval()
    path = save_checkpoint(
        peft_model, adapter_dir, domain, version,
        {"training_window": {"start": 0, "end": 1, "events": 10}, "metrics": {"loss": 0.1}},
    )
    return path, peft_model


def context(user: str = "u1", history: tuple[str, ...] = ("i1", "i2", "i3"), domain: str | None = None) -> UserContext:
    return UserContext(user, tuple(HistoryEntry(h, 4.0 if n % 2 == 0 else None) for n, h in enumerate(history)), domain=domain)


def reference_scores(model, tok, items: list[Item], ctx: UserContext, candidates: list[str]) -> dict[str, float]:
    """Scores computed directly with ``model`` (e.g. the unmerged PEFT model), outside the scorer."""
    by_id = {it.item_id: it for it in items}
    user_text = render_history(ctx, by_id.get)
    u = embed_texts(model, tok, [user_text], max_length=MAX_LENGTH)[0]
    iv = embed_texts(model, tok, [by_id[c].text() for c in candidates], max_length=MAX_LENGTH)
    return {c: float(s) for c, s in zip(candidates, (iv @ u).tolist())}
