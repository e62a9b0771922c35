"""Domain routing: one catalogue with books and movies, one adapter line per domain.

* activating an adapter for one domain changes only that domain's scores (the other keeps its exact scores);
* a request for an unknown domain is refused clearly (scorer: LookupError naming the domain; HTTP: 400);
* a new domain starts from the base model, or from a chosen source domain's adapter
  (``AdapterRegistry.start_domain`` / ``create_lora_model(init_from=...)``), without touching the source.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from driftrec.model.adapters import (
    WEIGHTS_NAME,
    AdapterRegistry,
    CheckpointError,
    _sha256,
    base_fingerprint,
    create_lora_model,
    save_checkpoint,
    verify_checkpoint,
)
from driftrec.model.catalogue import Catalogue
from driftrec.model.adapters import BASE_VERSION
from driftrec.model.serving.scorer import LMScorer
from driftrec.model.serving.server import create_app
from tests.scorer_support import (
    base_model_and_tokenizer,
    context,
    make_adapter,
    make_items,
    make_settings,
    reference_scores,
)

TOL = 2e-4
BOOKS = [f"b{k}" for k in range(3, 15)]
MOVIES = [f"m{k}" for k in range(3, 15)]


@pytest.fixture(scope="module")
def base():
    return base_model_and_tokenizer()


@pytest.fixture()
def items():
    return make_items(16, domain="books", seed=1, prefix="b") + make_items(16, domain="movies", seed=2, prefix="m")


@pytest.fixture()
def adir(tmp_path):
    return tmp_path / "adapters"


@pytest.fixture()
def scorer(base, items, adir):
    model, tok = base
    s = LMScorer(make_settings(adir), Catalogue(items), base_model=model, tokenizer=tok)
    yield s
    s.close()


def _ctx(domain: str):
    prefix = domain[0]
    return context(f"{prefix}-user", tuple(f"{prefix}{k}" for k in range(3)), domain=domain)


def _scores(scorer: LMScorer, domain: str, cands: list[str]):
    res = scorer.score(_ctx(domain), cands)
    return res, res.as_dict()


def _close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= TOL for k in a)


def test_one_adapter_per_domain_activation_changes_only_its_domain(scorer, base, items, adir):
    model, tok = base
    _, movies_pm = make_adapter(model, adir, "movies", "mv1", seed=1)
    _, books_pm = make_adapter(model, adir, "books", "bk1", seed=2)
    scorer.registry.mark_active("movies", BASE_VERSION)  # start both domains on the bare base model
    scorer.registry.mark_active("books", BASE_VERSION)
    scorer.start()
    assert {"books", "movies"} <= set(scorer.known_domains())
    r_books0, books0 = _scores(scorer, "books", BOOKS)
    r_movies0, movies0 = _scores(scorer, "movies", MOVIES)
    assert r_books0.domain == "books" and r_books0.adapter_version == BASE_VERSION
    assert r_movies0.domain == "movies" and r_movies0.adapter_version == BASE_VERSION
    assert _close(books0, reference_scores(model, tok, items, _ctx("books"), BOOKS))
    # each domain's catalogue is its own: another domain's items are unknown there, never scored
    mixed = scorer.score(_ctx("books"), BOOKS[:3] + MOVIES[:3])
    assert mixed.item_ids == tuple(BOOKS[:3]) and mixed.unknown == tuple(MOVIES[:3])

    # activate an adapter for movies: movies scores move, books scores stay exactly the same
    scorer.activate("movies", "mv1")
    r_movies1, movies1 = _scores(scorer, "movies", MOVIES)
    r_books1, books1 = _scores(scorer, "books", BOOKS)
    assert r_movies1.adapter_version == "mv1" and r_books1.adapter_version == BASE_VERSION
    assert max(abs(movies1[k] - movies0[k]) for k in MOVIES) > 1e-3
    assert _close(movies1, reference_scores(movies_pm, tok, items, _ctx("movies"), MOVIES))
    assert books1 == books0
    assert scorer.snapshot("books").adapter_version == BASE_VERSION

    # and the other way round
    scorer.activate("books", "bk1")
    r_books2, books2 = _scores(scorer, "books", BOOKS)
    _, movies2 = _scores(scorer, "movies", MOVIES)
    assert r_books2.adapter_version == "bk1"
    assert _close(books2, reference_scores(books_pm, tok, items, _ctx("books"), BOOKS))
    assert movies2 == movies1
    # a rollback in one domain leaves the other alone
    scorer.rollback("books")
    assert scorer.snapshot("books").adapter_version == BASE_VERSION
    assert _scores(scorer, "books", BOOKS)[1] == books0
    assert _scores(scorer, "movies", MOVIES)[1] == movies1
    status = scorer.adapters_status()["domains"]
    assert status["movies"]["serving"] == "mv1" and status["books"]["serving"] == BASE_VERSION
    # an adapter of one domain cannot be activated under another domain's name
    with pytest.raises(LookupError, match="no adapter version 'mv1' for domain 'books'"):
        scorer.activate("books", "mv1")
    with pytest.raises(CheckpointError):
        scorer.activate("books", "mv1", path=adir / "movies" / "mv1")
    assert scorer.snapshot("books").adapter_version == BASE_VERSION


def test_unknown_domain_is_refused(scorer, adir):
    scorer.start()
    with pytest.raises(LookupError, match="no snapshot serving domain 'games'"):
        scorer.score(_ctx("games"))
    with pytest.raises(LookupError, match="no adapter version 'v1' for domain 'games'"):
        scorer.activate("games", "v1")
    with pytest.raises(CheckpointError):
        scorer.activate("../books", "v1")
    assert scorer.snapshot("games") is None and not scorer.has_domain("games")
    with pytest.raises(LookupError):
        scorer.rollback("games")
    # nothing was created for the unknown domain
    assert "games" not in AdapterRegistry(adir).domains()


async def test_http_routes_by_domain_and_refuses_unknown(base, items, adir):
    model, tok = base
    make_adapter(model, adir, "movies", "mv1", seed=1)
    settings = make_settings(adir)
    scorer = LMScorer(settings, Catalogue(items), base_model=model, tokenizer=tok)
    client = TestClient(TestServer(create_app(settings, scorer, watch=False)))
    await client.start_server()
    try:
        for _ in range(300):
            if (await client.get("/readyz")).status == 200:
                break
            await asyncio.sleep(0.05)
        for domain, version, cands in (("movies", "mv1", MOVIES[:4]), ("books", BASE_VERSION, BOOKS[:4])):
            resp = await client.post("/v1/score", json={"history": ["x0"], "candidates": cands, "domain": domain})
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            assert body["domain"] == domain and body["adapter_version"] == version
        for bad in ("games", "../movies"):
            resp = await client.post("/v1/score", json={"candidates": MOVIES[:2], "domain": bad})
            assert resp.status == 400
            assert "domain" in (await resp.json())["error"]
    finally:
        await client.close()
        scorer.close()


def test_new_domain_starts_from_base_or_from_a_source_domain(scorer, base, items, adir):
    model, tok = base
    src_path, movies_pm = make_adapter(model, adir, "movies", "mv1", seed=3)
    src_sha = _sha256(src_path / WEIGHTS_NAME)
    scorer.start()
    # no adapter for books yet: it serves the base model
    assert scorer.snapshot("movies").adapter_version == "mv1"
    assert scorer.snapshot("books").adapter_version == BASE_VERSION
    books_base = _scores(scorer, "books", BOOKS)[1]
    assert _close(books_base, reference_scores(model, tok, items, _ctx("books"), BOOKS))

    # a source domain without any adapter cannot seed anything: neither one never seen, nor one the
    # scorer serves with the bare base model (its registry marks "base" active) - a clear ValueError
    with pytest.raises(ValueError, match="has no adapter"):
        scorer.registry.start_domain("comics", "games")
    assert scorer.registry.active("books") == BASE_VERSION
    with pytest.raises(ValueError, match="serves the base model"):
        scorer.registry.start_domain("comics", "books")
    assert "comics" not in scorer.registry.domains()

    # seed books from the movies adapter: the watcher picks it up, books now scores like movies' adapter
    dest = scorer.registry.start_domain("books", "movies")
    assert dest.parent.name == "books" and dest.name == "from-movies-mv1"
    ckpt = verify_checkpoint(dest, adir, base_fingerprint=base_fingerprint(model.config))
    assert ckpt.manifest["parent"] == {"domain": "movies", "version": "mv1"}
    with pytest.raises(FileExistsError):
        scorer.registry.start_domain("books", "movies")
    assert scorer.poll_adapters() == [("books", "from-movies-mv1")]
    assert scorer.snapshot("books").adapter_version == "from-movies-mv1"
    books_seeded = _scores(scorer, "books", BOOKS)[1]
    assert _close(books_seeded, reference_scores(movies_pm, tok, items, _ctx("books"), BOOKS))
    assert max(abs(books_seeded[k] - books_base[k]) for k in BOOKS) > 1e-3

    # fine-tune the seeded copy (create_lora_model(init_from=...)): it starts equal to the source ...
    warm = create_lora_model(model, init_from=dest, adapter_dir=adir)
    src_state = {k: v for k, v in ckpt.tensors.items()}
    from peft import get_peft_model_state_dict

    own = get_peft_model_state_dict(warm)
    assert own.keys() == src_state.keys() and all(torch.equal(own[k].float(), src_state[k]) for k in own)
    trainable = [n for n, p in warm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, p in warm.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    warm.eval()
    new_path = save_checkpoint(warm, adir, "books", "bk2", {"parent": {"domain": "books", "version": dest.name}})
    # ... and training it never changes the source domain's checkpoint, adapter or scores
    assert _sha256(src_path / WEIGHTS_NAME) == src_sha
    assert not any("lora_" in n for n, _ in model.named_parameters())
    movies_before = _scores(scorer, "movies", MOVIES)[1]
    scorer.activate("books", new_path.name)
    assert scorer.snapshot("books").adapter_version == "bk2"
    assert scorer.snapshot("movies").adapter_version == "mv1"
    assert _scores(scorer, "movies", MOVIES)[1] == movies_before
    books_ft = _scores(scorer, "books", BOOKS)[1]
    assert max(abs(books_ft[k] - books_seeded[k]) for k in BOOKS) > 1e-4
    # a new domain can equally start from the base model: PEFT's zero-B init scores like the base
    fresh = create_lora_model(model, r=4, alpha=8, dropout=0.0).eval()
    assert _close(reference_scores(fresh, tok, items, _ctx("books"), BOOKS), books_base)
