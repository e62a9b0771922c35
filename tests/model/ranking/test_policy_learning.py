"""How the ranking policy learns, on a small synthetic world with a real (tiny) knowledge model:

* ``observe_many`` (the knowledge model's forwards batched) gives bit-for-bit what observing the events
  one by one gives: the same fusion weights and the same lists;
* a batched user vector equals the one-user forward to the bit (the length buckets);
* the hard-pool schedule: the whole catalogue is ranked at one of every ``hard_pool_every`` learning
  positives of a user, whatever is ranked in between;
* ``learn_fraction``: a stable share of positives is learnt, the same pairs in every run.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from driftrec.model.evaluation.world import World
from driftrec.model.knowledge.seqrec import KnowledgeTrainer
from driftrec.model.ranking.policy import PolicyConfig, RankingPolicy


def _rating(ev):
    r = getattr(ev, "rating", None)
    return None if r is None else float(r)


@pytest.fixture(scope="module")
def world():
    w = World(n_users=40, n_items=120, seed=5)
    items = {it.item_id: it for it in w.items}
    events = [(e.user_id, e.item_id, _rating(e), e.event_time) for e in w.events(1600)]
    torch.manual_seed(0)
    hist: dict[str, list] = {}
    for u, i, r, _ in events[:600]:
        hist.setdefault(u, []).append((i, 5.0 if r is None else r))
    trainer = KnowledgeTrainer(items, list(items), text=False, dim=16, blocks=1, init_epochs=2)
    trainer.fit(list(hist.items()), initial=True)
    return items, events, trainer.model()


def _policy(items, **cfg) -> RankingPolicy:
    return RankingPolicy(PolicyConfig(**cfg), items, list(items))


@pytest.mark.parametrize("cfg", [dict(hard_pool_every=1, learn_fraction=1.0), dict(hard_pool_every=3, learn_fraction=0.5)])
def test_observe_many_is_observe_one_by_one(world, cfg):
    items, events, model = world
    warm = _policy(items, **cfg)
    for ev in events[:600]:
        warm.observe(*ev)
    warm.set_model(model)
    one, many = pickle.loads(pickle.dumps(warm)), pickle.loads(pickle.dumps(warm))
    for ev in events[600:]:
        one.observe(*ev)
    batched = 0
    for a in range(0, 1000, 97):  # blocks that do not divide the stream evenly
        block = events[600 + a:600 + a + 97]
        batched += many.prefetch(block)
        for ev in block:
            many.observe(*ev)
    assert batched > 50  # the forwards were batched ...
    assert one.corrector.n_learned == many.corrector.n_learned > 0
    assert one.corrector.weights() == many.corrector.weights()  # ... and nothing changed, to the bit
    ts = events[-1][3] + 60
    for user in sorted(one.hist)[:20]:
        assert one.recommend(user, 10, ts) == many.recommend(user, 10, ts)


def test_batched_user_vectors_are_the_one_user_forward(world):
    items, events, model = world
    rng = np.random.default_rng(0)
    ids = list(items)
    histories = [[ids[j] for j in rng.integers(0, len(ids), size=n)] for n in (1, 3, 7, 8, 15, 16, 31, 33, 49, 60, 120)]
    batch = model.user_vectors(histories)
    for h, row in zip(histories, batch):
        assert torch.equal(model.user_vector(h), row)
    rows = model.score_items_many(histories, [[5.0] * len(h) for h in histories], ids)
    for h, row in zip(histories, rows):
        assert np.array_equal(model.score_items(h, [5.0] * len(h), ids), row)


def test_hard_pool_is_ranked_at_every_nth_learning_positive_of_the_user(world, monkeypatch):
    items, events, _ = world
    calls: list[str] = []
    policies = {}
    for every in (1, 4):
        p = _policy(items, hard_pool_every=every)
        real = p.score_all
        monkeypatch.setattr(p, "score_all", lambda u, ts, real=real: (calls.append(u), real(u, ts))[1])
        calls.clear()
        for ev in events[:800]:
            p.observe(*ev)
        policies[every] = (len(calls), p.corrector.n_learned // (2 * p.cfg.negatives))
        assert policies[every][1] > 100
    (ranked1, groups1), (ranked4, groups4) = policies[1], policies[4]
    assert ranked1 == groups1  # every learning positive ranks the catalogue
    assert groups4 / 4 <= ranked4 <= groups4 / 4 + 40  # one in four, plus each user's first (40 users)


def test_learn_fraction_is_a_stable_share(world):
    items, events, _ = world
    full, quarter = _policy(items, learn_fraction=1.0), _policy(items, learn_fraction=0.25)
    again = _policy(items, learn_fraction=0.25)
    for ev in events[:800]:
        full.observe(*ev)
        quarter.observe(*ev)
        again.observe(*ev)
    share = quarter.corrector.n_learned / full.corrector.n_learned
    assert 0.15 < share < 0.35
    assert quarter.corrector.weights() == again.corrector.weights()
    assert quarter.learns_from("u1", "m9") == again.learns_from("u1", "m9")
    with pytest.raises(ValueError):
        PolicyConfig(learn_fraction=0.0)
    with pytest.raises(ValueError):
        PolicyConfig(hard_pool_every=0)


def test_features_of_some_columns_are_those_columns_of_the_whole_catalogue(world):
    """The learning path computes features for a positive and its negatives only (the knowledge model's
    rank by counting instead of a sort): they must be the whole-catalogue features of those items."""
    items, events, model = world
    p = _policy(items)
    for ev in events[:700]:
        p.observe(*ev)
    p.set_model(model)
    rng = np.random.default_rng(2)
    ts = events[699][3] + 1
    for user in sorted(p.hist)[:10]:
        full = p.features(user, None, ts)
        cols = rng.integers(0, len(p.item_ids), size=9)
        cols[4] = cols[0]
        some = p.features(user, cols, ts)
        np.testing.assert_allclose(some, full[cols], rtol=1e-6, atol=1e-9)  # item-kNN sums in float32
        for name in ("km", "km_rank"):
            j = p.feature_names.index(name)
            assert np.array_equal(some[:, j], full[cols, j])


def test_before_the_fusion_has_learnt_the_policy_ranks_by_its_prior_not_catalogue_order(world):
    """A worker's policy follows events into its state at once but gets its fusion from the learner process
    later: until the fusion has learnt anything it would score every item alike (catalogue order for
    everyone). It ranks by co-visitation + decayed popularity instead; once the fusion has learnt, by the
    fusion - and the replay's arm ranks by the same scores."""
    from driftrec.model.evaluation.arms import PolicyArm

    items, events, _ = world
    follower = _policy(items)
    follower.follow_many(events[:600])  # the state only, as the worker does with a learner process
    assert follower.corrector.n_learned == 0
    ts = events[599][3] + 60
    fused = follower.score_all("nobody", ts)
    assert np.ptp(fused) == 0  # the untrained fusion cannot tell items apart
    cold = [i for i, _ in follower.recommend("nobody", 10, ts)]
    assert cold != list(items)[:10]  # not catalogue order ...
    counts = follower.dpop.score_all("nobody", ts)
    top = np.argsort(-counts, kind="stable")[:10]
    assert cold == [follower.item_ids[j] for j in top]  # ... but decayed popularity, for a user with no history
    user = events[599][0]
    mine = [follower.item_ids[j] for j in np.argsort(-follower.rank_scores(user, ts), kind="stable")
            if j not in follower.seen.get(user, ())][:10]
    assert [i for i, _ in follower.recommend(user, 10, ts)] == mine != cold  # the user's co-visitation counts
    arm = PolicyArm("driftrec", follower)
    assert np.array_equal(arm.scores(user, ts), follower.rank_scores(user, ts))

    learnt = _policy(items)
    for ev in events[:600]:
        learnt.observe(*ev)
    assert learnt.corrector.n_learned > 0
    assert np.array_equal(learnt.rank_scores(user, ts), learnt.score_all(user, ts))


def test_scores_in_another_item_order_are_the_models_own_reordered(world):
    """A worker's catalogue order is not its model's: the scores it gets for its order (and, batched, for
    several users) are the model's own scores reordered, with an item the model does not know at the
    user's lowest score - also when the order changes between calls (the column map is kept)."""
    items, events, model = world
    own = list(model.item_ids)
    rng = np.random.default_rng(4)
    hists = [[own[j] for j in rng.integers(0, len(own), size=n)] for n in (2, 9, 20)]
    for trial in range(3):
        order = [own[j] for j in rng.permutation(len(own))]
        if trial == 2:
            order[5] = "not-in-the-model"
        for h in hists:
            mine = model.score_items(h, [5.0] * len(h), own)
            got = model.score_items(h, [5.0] * len(h), order)
            want = np.asarray([mine[own.index(i)] if i in own else mine.min() for i in order])
            assert np.array_equal(got, want)
        many = model.score_items_many(hists, [[5.0] * len(h) for h in hists], order)
        for h, row in zip(hists, many):
            assert np.array_equal(row, model.score_items(h, [5.0] * len(h), order))


def test_user_vectors_are_kept_until_the_history_or_the_model_changes(world, monkeypatch):
    items, events, model = world
    p = RankingPolicy(PolicyConfig(), items, list(reversed(list(items))))  # not the model's order
    for ev in events[:700]:
        p.observe(*ev)
    p.set_model(model)
    forwards: list[int] = []
    real = model.user_vector
    monkeypatch.setattr(model, "user_vector", lambda h: (forwards.append(len(h)), real(h))[1])

    def fresh(user):
        return model.score_items([p.item_ids[i] for i, _ in p.hist[user]], [], p.item_ids)

    users = sorted(p.hist)[:4]
    first = {u: p.model_scores(u).copy() for u in users}
    assert len(forwards) == 4
    for u in users:  # asked again (the one-answer memo holds the last user only): no new forward
        assert np.array_equal(p.model_scores(u), first[u])
        assert np.array_equal(first[u], fresh(u))
    assert len(forwards) == 4 + 4  # fresh() ran the model itself
    u = users[0]
    item = next(i for i in p.item_ids if p.index[i] not in p.seen[u])
    p.observe(u, item, 5.0, events[699][3] + 1)  # a new interaction: the vector is computed again
    n = len(forwards)
    assert np.array_equal(p.model_scores(u), fresh(u))
    assert len(forwards) >= n + 1 and forwards[n] == len(p.hist[u])
    assert not np.array_equal(p.model_scores(u), first[u])
    n = len(forwards)
    p.set_model(model)  # a new model (here: the same one again) - nothing kept survives it
    p.model_scores(users[1])
    assert len(forwards) == n + 1
    p.USER_VECTORS = 2
    for u in users:
        p.model_scores(u)
    assert len(p._uvecs) == 2 and list(p._uvecs) == users[2:]


def test_ranked_features_are_those_the_ranking_used_until_the_state_moves(world):
    """What a server explains its list with: the rows of the matrix the last ranking computed (same user,
    time, state and model), else the features computed afresh."""
    items, events, model = world
    p = _policy(items)
    for ev in events[:700]:
        p.observe(*ev)
    p.set_model(model)
    ts = events[699][3] + 1
    user = sorted(p.hist)[3]
    top = [p.index[i] for i, _ in p.recommend(user, 10, ts)]
    assert p.corrector.n_learned > 0  # so the fusion's score_all ranked
    full = p.features(user, None, ts)
    assert np.array_equal(p.ranked_features(user, top, ts), full[top])
    np.testing.assert_allclose(p.ranked_features(user, top, ts), p.features(user, top, ts), rtol=1e-6, atol=1e-9)
    other = sorted(p.hist)[4]
    assert np.array_equal(p.ranked_features(other, top, ts), p.features(other, top, ts))  # not the ranked user
    p.observe(user, p.item_ids[top[0]], 5.0, ts)  # the state moved: computed afresh
    assert np.array_equal(p.ranked_features(user, top, ts + 1), p.features(user, top, ts + 1))


def test_the_models_best_never_interacted_item_takes_the_new_item_slot(world):
    """Items nobody has interacted with have no collaborative signal; the knowledge model's best of them
    for the user enters the ranking at ``new_item_position`` when the model ranks it within its own top
    ``new_item_model_rank`` - the rest of the list keeps its order, one place down from there."""
    items, events, model = world
    fresh_ids = set(list(items)[-6:])
    kept = [ev for ev in events[:900] if ev[1] not in fresh_ids]
    ts = kept[-1][3] + 1

    def policy(**cfg):
        p = _policy(items, **cfg)
        for ev in kept:
            p.observe(*ev)
        p.set_model(model)
        return p

    on, off = policy(new_item_position=3, new_item_model_rank=10_000), policy(new_item_position=0)
    assert on.corrector.n_learned > 0
    fresh = [on.index[i] for i in fresh_ids]
    assert all(on.n_int[j] == 0 for j in fresh)
    moved = 0
    for user in sorted(on.hist)[:10]:
        km = on.model_scores(user)
        best = on.item_ids[max(fresh, key=lambda j: km[j])]
        got = [i for i, _ in on.recommend(user, 10, ts)]
        base = [i for i, _ in off.recommend(user, 10, ts)]
        assert np.array_equal(on.fused_scores(user, ts), off.fused_scores(user, ts))  # learning sees the fusion
        if best in base[:3]:
            assert got == base
            continue
        moved += 1
        assert got.index(best) == 2
        assert [i for i in got if i != best] == [i for i in base if i != best][:9]
    assert moved > 0
    # the model must rank the item within its own top N: with N = 1 only a user whose model top item is new
    strict = policy(new_item_position=3, new_item_model_rank=1)
    checked = 0
    for user in sorted(strict.hist)[:10]:
        km = strict.model_scores(user)
        allowed = strict.allowed(user)
        top_is_new = int(np.flatnonzero(allowed)[np.argmax(km[allowed])]) in fresh
        base = [i for i, _ in off.recommend(user, 10, ts)]
        if not top_is_new:
            checked += 1
            assert [i for i, _ in strict.recommend(user, 10, ts)] == base
    assert checked > 0
    # no model: nothing to rank new items with, the slot is idle
    bare = _policy(items, new_item_position=1, new_item_model_rank=10_000)
    for ev in kept:
        bare.observe(*ev)
    user = sorted(bare.hist)[0]
    assert np.array_equal(bare.rank_scores(user, ts), bare.fused_scores(user, ts))
    with pytest.raises(ValueError):
        PolicyConfig(new_item_position=-1)


def test_a_batch_of_requests_gets_its_user_vectors_in_one_forward_and_the_same_lists(world, monkeypatch):
    """``prefetch_users`` (the recommend stage, before ranking a batch's requests): the stale vectors in one
    batched call, none for a user whose vector is kept, and every list as without it, to the bit."""
    items, events, model = world
    plain, batched = _policy(items), _policy(items)
    for p in (plain, batched):
        for ev in events[:700]:
            p.observe(*ev)
        p.set_model(model)
    ts = events[699][3] + 60
    users = sorted(plain.hist)[:12]
    want = {u: plain.recommend(u, 10, ts) for u in users}
    calls: list[int] = []
    one: list[int] = []
    real_many, real_one = model.user_vectors, model.user_vector
    monkeypatch.setattr(model, "user_vectors", lambda hs, *a, **kw: (calls.append(len(hs)), real_many(hs, *a, **kw))[1])
    monkeypatch.setattr(model, "user_vector", lambda h: (one.append(len(h)), real_one(h))[1])
    batched.model_scores(users[0])  # this one's vector is kept already
    one.clear(), calls.clear()
    assert batched.prefetch_users(users + users[:3]) == len(users) - 1
    assert calls == [len(users) - 1]
    assert {u: batched.recommend(u, 10, ts) for u in users} == want
    assert one == []  # every ranking found its vector kept
    assert batched.prefetch_users(users) == 0  # nothing stale: no forward
    u = users[1]
    item = next(i for i in batched.item_ids if batched.index[i] not in batched.seen[u])
    batched.observe(u, item, 5.0, ts + 1)  # a new interaction: that user's vector is stale again
    assert batched.prefetch_users(users) == 0  # one stale user: left to its own forward
    got = batched.recommend(u, 10, ts + 2)
    assert one == [len(batched.hist[u])]
    plain.observe(u, item, 5.0, ts + 1)
    assert got == plain.recommend(u, 10, ts + 2)
