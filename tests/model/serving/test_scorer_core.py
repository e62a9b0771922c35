"""The LM scorer itself: reference scores, adapter swaps, rejections, watcher, catalogue refresh."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from prometheus_client import REGISTRY

from driftrec.model.adapters import WEIGHTS_NAME
from driftrec.model.base import UserContext
from driftrec.model.catalogue import Catalogue
from driftrec.model.adapters import BASE_VERSION
from driftrec.model.serving.scorer import LMScorer
from driftrec.model.text import render_history
from driftrec.core.contracts import AdapterAnnouncement, Item
from tests.scorer_support import (
    base_model_and_tokenizer,
    context,
    make_adapter,
    make_items,
    make_settings,
    reference_scores,
)

CANDS = [f"i{k}" for k in range(5, 25)]
TOL = 2e-4


@pytest.fixture(scope="module")
def base():
    return base_model_and_tokenizer()


@pytest.fixture()
def items():
    return make_items(30)


@pytest.fixture()
def scorer(base, items, tmp_path):
    model, tok = base
    s = LMScorer(make_settings(tmp_path / "adapters"), Catalogue(items), base_model=model, tokenizer=tok)
    yield s
    s.close()


def _rejections(reason: str) -> float:
    return REGISTRY.get_sample_value("driftrec_checkpoint_rejections_total", {"reason": reason}) or 0.0


def _assert_matches(result, ref):
    assert list(result.item_ids) == list(ref)
    diff = max(abs(s - ref[i]) for i, s in zip(result.item_ids, result.scores))
    assert diff < TOL, diff


def test_user_text_is_history_newest_first(items):
    by_id = {it.item_id: it for it in items}
    ctx = context(history=("i3", "i1"))
    text = render_history(ctx, by_id.get)
    assert text.index(by_id["i3"].title) < text.index(by_id["i1"].title)
    assert "rated 4/5" in text and "(clicked)" in text
    assert render_history(UserContext("u"), by_id.get)  # cold user: still a non-empty text


def test_scores_match_reference_and_follow_adapters(scorer, base, items, tmp_path):
    model, tok = base
    adir = tmp_path / "adapters"
    scorer.start()
    ctx = context()
    r0 = scorer.score(ctx, CANDS)
    assert r0.adapter_version == BASE_VERSION and scorer.ready()
    _assert_matches(r0, reference_scores(model, tok, items, ctx, CANDS))
    _, pm1 = make_adapter(model, adir, "default", "v1", seed=1)
    _, pm2 = make_adapter(model, adir, "default", "v2", seed=2)
    scorer.activate("default", "v1")
    r1 = scorer.score(ctx, CANDS)
    assert r1.adapter_version == "v1"
    ref1 = reference_scores(pm1, tok, items, ctx, CANDS)
    _assert_matches(r1, ref1)
    assert max(abs(a - b) for a, b in zip(r0.scores, r1.scores)) > 0.05  # the adapter changed the scores
    scorer.activate("default", "v2")
    _assert_matches(scorer.score(ctx, CANDS), reference_scores(pm2, tok, items, ctx, CANDS))
    scorer.rollback("default")
    r = scorer.score(ctx, CANDS)
    assert r.adapter_version == "v1"
    _assert_matches(r, ref1)
    assert scorer.version_info().adapter_version == "v1"
    assert scorer.adapters_status()["domains"]["default"]["active"] == "v1"
    with pytest.raises(LookupError):
        scorer.activate("default", "nope")
    # unknown candidates are reported, not scored; None = whole catalogue
    r = scorer.score(ctx, ["i1", "zzz"])
    assert r.item_ids == ("i1",) and r.unknown == ("zzz",)
    assert len(scorer.score(ctx).item_ids) == len(items)


@pytest.mark.faults  # issue 9 fault suite
def test_bad_checkpoints_rejected_while_serving(scorer, base, items, tmp_path):
    model, tok = base
    adir = tmp_path / "adapters"
    _, pm1 = make_adapter(model, adir, "default", "v1", seed=1)
    scorer.start()
    assert scorer.snapshot().adapter_version == "v1"  # newest valid version at start
    ctx = context()
    ref1 = reference_scores(pm1, tok, items, ctx, CANDS)

    bad_sum, _ = make_adapter(model, adir, "default", "badsum", seed=3)
    (bad_sum / WEIGHTS_NAME).write_bytes((bad_sum / WEIGHTS_NAME).read_bytes()[:-8] + b"\0" * 8)
    pickled, _ = make_adapter(model, adir, "default", "pickled", seed=4)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04.")
    outside = tmp_path / "evil" / "default" / "v9"
    shutil.copytree(adir / "default" / "v1", outside)
    (adir / "default" / "linked").symlink_to(outside)

    before = {r: _rejections(r) for r in ("checksum", "untrusted")}
    for version, reason in (("badsum", "checksum"), ("pickled", "untrusted"), ("linked", "untrusted")):
        with pytest.raises(Exception) as exc:
            scorer.activate("default", version)
        assert getattr(exc.value, "reason", None) == reason
        r = scorer.score(ctx, CANDS)
        assert r.adapter_version == "v1"
        _assert_matches(r, ref1)
    assert _rejections("checksum") == before["checksum"] + 1
    assert _rejections("untrusted") == before["untrusted"] + 2
    with pytest.raises(Exception):
        scorer.activate("default", "v9", path=str(outside))  # absolute path outside the adapter dir
    with pytest.raises(Exception):
        scorer.activate("default", "v9", path="../evil/default/v9")
    assert scorer.snapshot().adapter_version == "v1"
    assert [r["version"] for r in scorer.adapters_status()["rejected"]][-3:] == ["linked", "v9", "v9"]


async def test_watcher_and_announcements(scorer, base, items, tmp_path):
    model, tok = base
    adir = tmp_path / "adapters"
    scorer.start()
    assert scorer.poll_adapters() == []
    make_adapter(model, adir, "default", "v1", seed=1)
    assert scorer.poll_adapters() == [("default", "v1")]
    bad, _ = make_adapter(model, adir, "default", "v2", seed=2)
    (bad / WEIGHTS_NAME).write_bytes(b"junk")
    assert scorer.poll_adapters() == []  # rejected, and not retried every tick
    assert scorer.snapshot().adapter_version == "v1"
    path3, _ = make_adapter(model, adir, "default", "v3", seed=3)
    ann = AdapterAnnouncement(event_id="a1", event_time=1.0, domain="default", version="v3", path=str(path3))
    assert await scorer.on_announcement(ann) is True
    assert scorer.snapshot().adapter_version == "v3"
    assert scorer.poll_adapters() == []  # already seen through the announcement
    evil = AdapterAnnouncement(event_id="a2", event_time=1.0, domain="default", version="v1", path="/etc")
    assert await scorer.on_announcement(evil) is False
    back = AdapterAnnouncement(event_id="a3", event_time=1.0, domain="default", version="", path="", action="rollback")
    assert await scorer.on_announcement(back) is True
    assert scorer.snapshot().adapter_version == "v1"
    named = AdapterAnnouncement(event_id="a4", event_time=1.0, domain="default", version="v3", path="", action="rollback")
    assert await scorer.on_announcement(named) is True  # a rollback naming its target serves exactly it
    assert scorer.snapshot().adapter_version == "v3"
    # a new domain appears on disk: it gets its own snapshot, the default domain is untouched
    make_adapter(model, adir, "books", "b1", seed=5)
    assert scorer.poll_adapters() == [("books", "b1")]
    assert scorer.snapshot("books").adapter_version == "b1"
    assert scorer.snapshot().adapter_version == "v3"


def test_catalogue_updates_and_concurrent_scoring(scorer, base, items, tmp_path):
    model, tok = base
    adir = tmp_path / "adapters"
    _, pm1 = make_adapter(model, adir, "default", "v1", seed=1)
    _, pm2 = make_adapter(model, adir, "default", "v2", seed=2)
    scorer.start()
    ctx = context()
    new = Item(event_id="n", event_time=1.0, item_id="new1", title="Storm Garden", genres=["drama"], year=2001)
    scorer.catalogue.upsert([new])
    all_items = items + [new]
    cands = CANDS + ["new1"]
    r = scorer.score(ctx, cands)  # not yet in the snapshot: embedded on demand with the snapshot's model
    assert r.adapter_version == "v2"
    ref2 = reference_scores(pm2, tok, all_items, ctx, cands)
    _assert_matches(r, ref2)
    assert scorer.refresh_items() == ["default"]
    assert "new1" in scorer.snapshot().index
    _assert_matches(scorer.score(ctx, cands), ref2)

    refs = {"v1": reference_scores(pm1, tok, all_items, ctx, cands), "v2": ref2}
    errors: list[str] = []
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            res = scorer.score(ctx, cands)
            ref = refs[res.adapter_version]
            if max(abs(s - ref[i]) for i, s in zip(res.item_ids, res.scores)) > TOL:
                errors.append(res.adapter_version)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for n in range(6):
        scorer.activate("default", "v1" if n % 2 == 0 else "v2")
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


def test_item_vectors_are_fused(base, tmp_path):
    model, tok = base
    items = make_items(12)
    for n, it in enumerate(items):
        it.vector = [1.0, 0.0] if n % 2 == 0 else [0.0, 1.0]
    s = LMScorer(make_settings(tmp_path / "a"), Catalogue(items), base_model=model, tokenizer=tok, vector_weight=0.5)
    plain = LMScorer(make_settings(tmp_path / "a"), Catalogue(items), base_model=model, tokenizer=tok, vector_weight=0.0)
    s.start()
    plain.start()
    ctx = context(history=("i0", "i2"))  # history items have the [1, 0] vector
    cands = [f"i{k}" for k in range(4, 12)]
    fused, lm = s.score(ctx, cands).as_dict(), plain.score(ctx, cands).as_dict()
    for k in range(4, 12):
        aux = 1.0 if k % 2 == 0 else 0.0
        assert fused[f"i{k}"] == pytest.approx(0.5 * lm[f"i{k}"] + 0.5 * aux, abs=1e-5)
    s.close()
    plain.close()


def test_decoder_model_folder(base, tmp_path):
    """Any local HF folder works: a tiny llama decoder saved next to a copy of the tokenizer."""
    from transformers import AutoModel, LlamaConfig

    from driftrec.model.lm import default_model_path

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path / "tiny-llama"
    AutoModel.from_config(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{default_model_path()}/{name}", folder / name)
    settings = make_settings(tmp_path / "adapters")
    settings.model.model_path = str(folder)
    scorer = LMScorer.from_settings(settings, Catalogue(make_items(10)))
    scorer.start()
    r = scorer.score(context(), ["i4", "i5"])
    assert len(r.scores) == 2 and r.model_version.startswith("tiny-llama@")
    from driftrec.model.adapters import create_lora_model, save_checkpoint

    peft_model = create_lora_model(scorer._master, settings)
    save_checkpoint(peft_model, settings.model.adapter_dir, "default", "d1")
    assert scorer.poll_adapters() == [("default", "d1")]
    scorer.close()


async def test_adapters_topic_messages(scorer, base, tmp_path):
    """Only signed, recent, new announcements are acted on; the rest are counted by reason."""
    import json as _json
    import time

    from driftrec.core import metrics
    from driftrec.core.signing import Verifier, signed
    from driftrec.model.serving.announcements import handle_messages, parse_announcement

    key = b"k" * 32
    model, _ = base
    adir = tmp_path / "adapters"
    scorer.start()
    path, _ = make_adapter(model, adir, "default", "k1", seed=7)
    now = time.time()
    good = signed(AdapterAnnouncement(event_id="x", event_time=now, domain="default", version="k1",
                                      path=str(path)).to_wire(), key)
    with pytest.raises(ValueError):
        parse_announcement(b'{"type": "adapter", "domain": "../x", "version": "k1"}')
    with pytest.raises(ValueError):
        parse_announcement(b'{"type": "click"}')
    forged = {**good, "event_id": "y", "action": "rollback", "version": ""}  # fields changed, old signature
    unsigned = {k: v for k, v in good.items() if k != "signature"} | {"event_id": "z"}
    stale = signed({**good, "event_id": "old", "event_time": now - 3600}, key)
    wrong_key = signed({**good, "event_id": "w"}, b"x" * 32)

    def count(reason):
        return metrics.CONTROL_REJECTED.labels(reason=reason)._value.get()

    before = {r: count(r) for r in ("malformed", "unsigned", "bad_signature", "stale", "replayed", "no_key")}

    async def messages(*raws):
        for raw in raws:
            yield raw if isinstance(raw, bytes) else _json.dumps(raw).encode()

    verifier = Verifier(key, max_age_s=600)
    sent = (b"not json", {"domain": "default", "version": "../../etc"}, forged, unsigned, stale, wrong_key, good, good)
    assert await handle_messages(scorer, messages(*sent), verifier) == 1
    assert scorer.snapshot().adapter_version == "k1"
    after = {r: count(r) - before[r] for r in before}
    assert after == {"malformed": 2, "unsigned": 1, "bad_signature": 2, "stale": 1, "replayed": 1, "no_key": 0}
    # without a key nothing on the topic is acted on, however well-formed
    assert await handle_messages(scorer, messages(good), Verifier(None)) == 0
    assert count("no_key") - before["no_key"] == 1


def test_catalogue_versions_and_jsonl(tmp_path):
    cat = Catalogue(default_domain="default")
    items = make_items(3)
    assert cat.upsert(items) == {"default": 1}
    redelivered = [Item(**{**it.asdict(), "event_id": "again", "event_time": 2.0}) for it in items]
    assert cat.upsert(redelivered) == {}  # same content, new envelope: no change
    changed = Item(**{**items[0].asdict(), "title": "Renamed"})
    assert cat.upsert([changed]) == {"default": 2}
    assert cat.get("i0").title == "Renamed" and len(cat) == 3
    view = cat.view()
    cat.remove(["i1"])
    assert "i1" in view and "i1" not in cat.view()  # old views are immutable
    path = tmp_path / "items.jsonl"
    path.write_text('{"item_id": "b1", "title": "Book", "domain": "books"}\n\n{"item_id": "b2", "title": "B2"}\n')
    assert cat.load_jsonl(path) == {"books": 1, "default": 4}
    path.write_text('{"item_id": "b3", "title": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=":2:"):
        cat.load_jsonl(path)
    with pytest.raises(ValueError, match="title"):
        cat.load_dicts([{"item_id": "x"}])
