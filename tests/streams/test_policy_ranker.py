"""PolicyRanker in process: the ranking policy behind the recommend stage, without a broker.

The app is a stand-in with real settings and a small catalogue; the interaction follower is fed by
hand (``follower._deliver``, what it does for every record it reads). The policy, the knowledge model
and its checkpoints are the real ones.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from driftrec.core import metrics
from driftrec.core.contracts import Click, Item, Rating, RecommendationRequest
from driftrec.core.settings import RankingSettings, Settings
from driftrec.model.evaluation.prequential import EvalConfig
from driftrec.model.ranking.policy import PolicyConfig, RankingPolicy
from driftrec.streams.policy_ranker import REASONS, PolicyRanker
from driftrec.streams.ranking import LoopRanker
from driftrec.streams.rankers import build_ranker

GENRES = ["space", "western", "romance", "horror"]
ITEMS = [Item(event_id=f"item-{n}", event_time=1_700_000_000.0, item_id=f"m{n}", title=f"Film {n}",
              genres=[GENRES[n % 4]], year=1980 + n) for n in range(16)]
T0 = 1_700_000_000.0
_ids = iter(range(10**9))


class _Catalogue:
    def __init__(self):
        self.items: dict[str, Item] = {}
        self._callbacks = []
        self.caught_up = asyncio.Event()

    def on_item(self, cb):
        self._callbacks.append(cb)

    def add(self, item):
        self.items[item.item_id] = item
        for cb in self._callbacks:
            cb(item)


class _App:
    def __init__(self, tmp_path, **ranking):
        self.settings = Settings(model={"adapter_dir": str(tmp_path / "adapters")},
                                 ranking={"engine": "policy", "model_watch_interval_s": 0.05, **ranking})
        self.catalogue = _Catalogue()
        self.bootstrap_servers = "127.0.0.1:1"  # never connected to: the follower's task is not run
        self.tasks = []

    def task(self, fn):
        self.tasks.append(fn)
        return fn


def _events(n=300, seed=0):
    import random

    rng = random.Random(seed)
    out = []
    for e in range(n):
        u = f"u{rng.randrange(12)}"
        g = int(u[1:]) % 4
        pool = [it for k, it in enumerate(ITEMS) if k % 4 == g] if rng.random() < 0.8 else ITEMS
        item = rng.choice(pool).item_id
        t = T0 + 60 * e
        if rng.random() < 0.5:
            out.append(Click(event_id=f"c{next(_ids)}", event_time=t, user_id=u, item_id=item))
        else:
            out.append(Rating(event_id=f"r{next(_ids)}", event_time=t, user_id=u, item_id=item,
                              rating=float(rng.choice([2, 3, 4, 5]))))
    return out


_made: list[PolicyRanker] = []


@pytest.fixture(autouse=True)
def _stop_learners():
    yield
    while _made:
        _made.pop().stop()


def _make(tmp_path, **ranking):
    app = _App(tmp_path, **ranking)
    ranker = build_ranker(app)
    _made.append(ranker)
    assert isinstance(ranker, PolicyRanker)
    for it in ITEMS:
        app.catalogue.add(it)
    app.catalogue.caught_up.set()
    return app, ranker


async def _learnt(ranker, timeout: float = 60.0) -> None:
    """Let the ranker learn everything delivered (its learner process's fusion back, when it has one) and
    go live."""
    ranker.start_learning()
    deadline = asyncio.get_running_loop().time() + timeout
    while ranker._pending or not ranker.ready or ranker.backlog:
        assert asyncio.get_running_loop().time() < deadline, "the learning thread did not catch up"
        await asyncio.sleep(0.01)
    with ranker.lock:  # the last chunk is done
        pass


def _req(user, k=5, t=None, **kw):
    return RecommendationRequest(event_id=f"q{next(_ids)}", event_time=t or T0 + 10**6, user_id=user, k=k, **kw)


def _reference(events, model=None) -> RankingPolicy:
    policy = RankingPolicy(EvalConfig().policy_config(), {it.item_id: it for it in ITEMS}, [it.item_id for it in ITEMS],
                           model=model)
    for ev in events:
        policy.observe(ev.user_id, ev.item_id, ev.rating if isinstance(ev, Rating) else None, ev.event_time)
    return policy


def test_engine_setting_picks_the_ranker(tmp_path, monkeypatch):
    assert Settings().ranking.engine == "policy"  # the default: what driftrec evaluate measures is served
    app = _App(tmp_path)
    app.settings = Settings(ranking={"engine": "loop"})
    assert isinstance(build_ranker(app), LoopRanker)
    monkeypatch.setenv("DRIFTREC_RANKING__ENGINE", "policy")
    monkeypatch.setenv("DRIFTREC_RANKING__NEGATIVES", "4")
    s = Settings()
    assert s.ranking.engine == "policy" and PolicyConfig.from_settings(s.ranking).negatives == 4
    with pytest.raises(ValueError):
        RankingSettings(engine="http")


def test_replay_and_worker_build_the_same_policy_config():
    assert EvalConfig().policy_config() == PolicyConfig.from_settings(RankingSettings()) == PolicyConfig()
    cfg = EvalConfig(negatives=3, half_life_s=3600.0, seed=5, hard_pool_every=3, learn_fraction=0.5)
    assert cfg.policy_config() == PolicyConfig.from_settings(
        RankingSettings(negatives=3, half_life_s=3600.0, seed=5, hard_pool_every=3, learn_fraction=0.5))
    with pytest.raises(ValueError):
        PolicyConfig.from_settings(knn_user_decay=2.0)


@pytest.mark.parametrize("learner", ["process", "thread"])
async def test_serves_what_the_policy_ranks(tmp_path, learner):
    """Events read before the policy exists and after are learnt in order; once learnt, the worker ranks
    exactly as a policy that observed them one by one - whether its fusion is learnt by the learner
    process and sent back (the default) or on the worker's own thread."""
    assert Settings().ranking.learner == "process"
    app, ranker = _make(tmp_path, learner=learner)
    events = _events()
    before = metrics.FALLBACKS.labels(reason="policy_not_ready")._value.get()
    waiting = await ranker.rank(_req("u1"))
    assert waiting.fallback and metrics.FALLBACKS.labels(reason="policy_not_ready")._value.get() == before + 1
    for ev in events[:100]:  # read by the follower before the policy exists: buffered, in order
        ranker.follower._deliver(ev)
    observed = metrics.RANKING_OBSERVED._value.get()
    await ranker.start()
    for ev in events[100:]:
        ranker.follower._deliver(ev)
    await _learnt(ranker)
    assert ranker.observed == ranker.applied == len(events)
    assert metrics.RANKING_OBSERVED._value.get() == observed + len(events)
    assert (ranker.learner is not None) == (learner == "process")
    ref = _reference(events)
    assert ranker.policy.corrector.n_learned == ref.corrector.n_learned > 0
    ts = events[-1].event_time + 60
    for user in ("u0", "u1", "u5", "nobody"):
        ranked = await ranker.rank(_req(user, k=5, t=ts))
        assert not ranked.fallback and ranked.model_version == "collaborative" and ranked.domain == "default"
        assert [(i.item_id, i.score) for i in ranked.items] == [(i, round(s, 6)) for i, s in ref.recommend(user, 5, ts)]
        assert all(i.reason in REASONS.values() for i in ranked.items)
    seen = ref.seen["u1"]
    ranked = await ranker.rank(_req("u1", k=16, t=ts))
    assert not {ref.index[i.item_id] for i in ranked.items} & seen
    kept = await ranker.rank(_req("u1", k=16, t=ts, exclude_seen=False))
    assert len(kept.items) == 16
    only = await ranker.rank(_req("u1", k=5, t=ts, exclude_seen=False, candidates=["m3", "m2", "zzz"]))
    assert {i.item_id for i in only.items} == {"m2", "m3"}


async def test_new_items_join_and_online_hr_is_kept(tmp_path):
    app, ranker = _make(tmp_path)
    await ranker.start()
    new = Item(event_id="item-new", event_time=T0, item_id="fresh", title="Fresh", genres=["space"], year=2020)
    app.catalogue.add(new)
    assert ranker.policy.item_ids[-1] == "fresh"
    for ev in _events(80):
        ranker.follower._deliver(ev)
    await _learnt(ranker)
    ranked = await ranker.rank(_req("u2", k=10))
    shown = ranked.items[0].item_id
    ranker.learn(Click(event_id="fb", event_time=T0 + 10**6, user_id="u2", item_id=shown))
    assert metrics.ONLINE_HR_AT_10.labels(model="served")._value.get() > 0


async def test_a_failing_policy_falls_back_flagged(tmp_path, monkeypatch):
    app, ranker = _make(tmp_path)
    await ranker.start()
    for ev in _events(50):
        ranker.follower._deliver(ev)
    await _learnt(ranker)

    def boom(*a, **kw):
        raise RuntimeError("broken")

    monkeypatch.setattr(ranker.policy, "recommend", boom)
    before = metrics.FALLBACKS.labels(reason="policy_error")._value.get()
    ranked = await ranker.rank(_req("u1", k=3))
    assert ranked.fallback and ranked.items and ranked.model_version == "popularity"
    assert metrics.FALLBACKS.labels(reason="policy_error")._value.get() == before + 1


@pytest.mark.slow
async def test_knowledge_model_loaded_swapped_and_refused(tmp_path):
    """Loaded before the first event; a new ACTIVE version is swapped in; a tampered one is refused and
    counted, and the old model keeps serving. Same lists as a reference policy with the same model."""
    from driftrec.model.knowledge.checkpoint import WEIGHTS, load_knowledge, publish
    from driftrec.model.knowledge.seqrec import KnowledgeTrainer

    items = {it.item_id: it for it in ITEMS}
    events = _events(200)
    hist: dict[str, list] = {}
    for ev in events[:100]:
        hist.setdefault(ev.user_id, []).append((ev.item_id, 5.0))
    trainer = KnowledgeTrainer(items, list(items), dim=8, init_epochs=1, blocks=1)
    trainer.fit(list(hist.items()), initial=True)
    root = tmp_path / "adapters" / "knowledge"
    publish(trainer, root, "v1")

    app, ranker = _make(tmp_path)
    for ev in events[:50]:
        ranker.follower._deliver(ev)
    await ranker.start()
    assert ranker.model_name == "default/v1" and ranker.model_version == "v1"
    for ev in events[50:]:
        ranker.follower._deliver(ev)
    await _learnt(ranker)
    ref = _reference(events, model=load_knowledge(root / "default" / "v1", items))
    ts = events[-1].event_time + 60
    for user in ("u0", "u3", "u7"):
        ranked = await ranker.rank(_req(user, k=8, t=ts))
        assert ranked.model_version == "default/v1"
        assert [i.item_id for i in ranked.items] == [i for i, _ in ref.recommend(user, 8, ts)]

    trainer.fit(list(hist.items()))
    bad = publish(trainer, root, "v2")
    (bad / WEIGHTS).write_bytes((bad / WEIGHTS).read_bytes()[:-8] + b"\0" * 8)
    before = metrics.CHECKPOINT_REJECTIONS.labels(reason="checksum")._value.get()
    assert await ranker.check_model() is False
    assert metrics.CHECKPOINT_REJECTIONS.labels(reason="checksum")._value.get() == before + 1
    assert (await ranker.rank(_req("u0", t=ts))).model_version == "default/v1"
    assert await ranker.check_model() is False  # not retried while ACTIVE still names it
    assert metrics.CHECKPOINT_REJECTIONS.labels(reason="checksum")._value.get() == before + 1

    publish(trainer, root, "v3")
    assert await ranker.check_model() is True
    assert (await ranker.rank(_req("u0", t=ts))).model_version == "default/v3"
    (root / "default" / "ACTIVE").write_text("v3")
    assert await ranker.check_model() is False


async def test_requests_are_ranked_while_a_backlog_is_learnt(tmp_path):
    """Learning in the worker (``ranking.learner: thread``): a burst of events is learnt by the learning
    thread in chunks under the policy's lock; a request that arrives meanwhile is ranked (by the policy,
    not the fallback) without waiting for the burst, and the burst ends learnt in order (the same lists as
    one-by-one observation)."""
    from driftrec.streams.policy_ranker import LEARN_CHUNK

    app, ranker = _make(tmp_path, learner="thread")
    await ranker.start()
    await _learnt(ranker)
    events = _events(100 * LEARN_CHUNK, seed=3)
    # hold the learning thread between its 2nd and 3rd chunk (outside the lock), whatever the machine's speed
    learn_chunk, done, go = ranker.learn_chunk, [], threading.Event()

    def held_chunk():
        n = learn_chunk()
        done.append(n)
        if len(done) == 2:
            go.wait(30)
        return n

    ranker.learn_chunk = held_chunk
    for ev in events:
        ranker.follower._deliver(ev)
    for _ in range(500):  # the thread is at work: two chunks learnt, the rest waiting
        if len(done) >= 2:
            break
        await asyncio.sleep(0.01)
    ranked = await ranker.rank(_req("u4", k=5))
    backlog = len(ranker._pending)
    go.set()
    # the thread may start its first chunk while the burst is still being delivered (a short chunk): what
    # waits is exactly what its two chunks did not take
    assert len(done) == 2 and not ranked.fallback
    assert backlog == len(events) - sum(done) >= len(events) - 2 * LEARN_CHUNK
    await _learnt(ranker)
    assert ranker.observed == len(events)
    ts = events[-1].event_time + 60
    ref = _reference(events)
    assert [i.item_id for i in (await ranker.rank(_req("u4", k=8, t=ts))).items] == [i for i, _ in ref.recommend("u4", 8, ts)]


async def test_the_event_loop_takes_a_burst_in_between_requests(tmp_path):
    """With a learner process the event loop takes the delivered events into the serving state itself, a
    chunk at a time: a request ranked while a burst is being taken in is answered by the policy between two
    chunks (the burst not taken in yet), the burst ends in the state in order, and learnt (the learner's
    fusion back): the same lists as one-by-one observation."""
    from driftrec.streams.policy_ranker import LOOP_CHUNK

    app, ranker = _make(tmp_path)
    await ranker.start()
    await _learnt(ranker)
    assert ranker.learner is not None and ranker._learner is None  # no learning thread in this mode
    events = _events(50 * LOOP_CHUNK, seed=4)
    for ev in events:
        ranker.follower._deliver(ev)
    for _ in range(1000):  # the loop's task has taken a chunk or more, not the whole burst
        if ranker.applied >= LOOP_CHUNK:
            break
        await asyncio.sleep(0)
    ranked = await ranker.rank(_req("u4", k=5))
    waiting = len(ranker._pending)
    assert not ranked.fallback and ranked.model_version == ranker.model_name
    assert 0 < waiting <= len(events) - LOOP_CHUNK and waiting % LOOP_CHUNK == 0
    await _learnt(ranker)
    assert ranker.applied == ranker.observed == len(events)
    ts = events[-1].event_time + 60
    ref = _reference(events)
    assert [i.item_id for i in (await ranker.rank(_req("u4", k=8, t=ts))).items] == [i for i, _ in ref.recommend("u4", 8, ts)]


async def test_a_learner_process_that_dies_leaves_the_worker_learning(tmp_path):
    """The learner process is killed: the exit is counted, the worker learns in its own process from then
    on, and nothing delivered is left unlearnt (the fusion updates of the events in flight are lost)."""
    app, ranker = _make(tmp_path)
    await ranker.start()
    events = _events(200, seed=5)
    for ev in events[:100]:
        ranker.follower._deliver(ev)
    await _learnt(ranker)
    pid = ranker.learner.pid
    learnt = ranker.policy.corrector.n_learned
    exits = metrics.RANKING_LEARNER_EXITS._value.get()
    os.kill(pid, signal.SIGKILL)
    for _ in range(1000):
        if ranker.learner is None:
            break
        await asyncio.sleep(0.01)
    assert ranker.learner is None and ranker.learner_mode == "thread"
    assert metrics.RANKING_LEARNER_EXITS._value.get() == exits + 1
    for ev in events[100:]:
        ranker.follower._deliver(ev)
    await _learnt(ranker)
    assert ranker.observed == ranker.applied == len(events)
    assert ranker.policy.corrector.n_learned > learnt  # learning here now
    ranked = await ranker.rank(_req("u1", k=5))
    assert not ranked.fallback and len(ranked.items) == 5


@pytest.mark.parametrize("learner", ["process", "thread"])
async def test_an_event_the_policy_fails_on_is_logged_not_waited_for(tmp_path, monkeypatch, learner):
    """The policy raises on one event: its chunk is learnt one by one, that event is skipped (logged), and
    the backlog still drains to 0 - nothing waits for it, with or without the learner process."""
    app, ranker = _make(tmp_path, learner=learner)
    await ranker.start()
    events = _events(64, seed=7)
    bad = (events[10].user_id, events[10].item_id, events[10].event_time)

    def failing(real):
        def call(*a, **kw):
            evs = a[0] if isinstance(a[0], list) else [a]
            if any((e[0], e[1], e[3]) == bad for e in evs):
                raise RuntimeError("bad event")
            return real(*a, **kw)
        return call

    for name in ("follow_many",) if learner == "process" else ("observe_many", "observe"):
        monkeypatch.setattr(ranker.policy, name, failing(getattr(ranker.policy, name)))
    for ev in events:
        ranker.follower._deliver(ev)
    await _learnt(ranker)
    assert ranker.observed == ranker.applied == len(events) and ranker.backlog == 0 and ranker.ready
    assert not (await ranker.rank(_req("u1", k=5))).fallback
