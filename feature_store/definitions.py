"""driftrec's Feast repository, defined in code.

Two entities (``user``, ``item``), one push source and one feature view per entity, and two feature
services (``user_profile_v1``: the user's view; ``ranking_v1``: user + item views, what the scorer
reads). The streaming features stage is the only writer; it writes through the online store
directly in batches (see :mod:`driftrec.feature_store.writer`) and appends the same rows to the offline
store (:mod:`driftrec.feature_store.offline`), so ``get_historical_features`` builds point-in-time
training sets from them. The push sources exist so that other producers (a backfill, a notebook) can
push rows with ``FeatureStore.push`` too. The repository folder also holds ``driftrec_repo.py``, these
objects for Feast's CLI (``feast plan``, ``feast apply``, ``feast serve`` run there as in any repo).

List-valued features (the recent items, the genre profile) are stored as JSON strings: every online
store supports strings, and a reader decodes them (:mod:`driftrec.feature_store.reader`).

Field order matters nowhere; the column names below are the contract with readers:

user_features
    recent_items (JSON list of item ids, newest first), click_count, rating_count, mean_rating
    (0 when no ratings), last_event_time (unix s), genre_profile (JSON object genre -> weight, top
    genres over the recent items, weights summing to 1).
item_features
    click_count, rating_count, popularity_total (interactions), popularity_decayed (time-decayed
    interaction count as of ``popularity_time``), popularity_time (unix s), mean_rating,
    last_event_time (unix s). Decay to now with :func:`driftrec.feature_store.reader.decay_popularity`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.types import Float64, Int64, String
from feast.value_type import ValueType

USER_VIEW = "user_features"
ITEM_VIEW = "item_features"
USER_SERVICE = "user_profile_v1"
RANKING_SERVICE = "ranking_v1"

USER_FEATURES: dict[str, type] = {
    "recent_items": String,
    "click_count": Int64,
    "rating_count": Int64,
    "mean_rating": Float64,
    "last_event_time": Float64,
    "genre_profile": String,
}
ITEM_FEATURES: dict[str, type] = {
    "click_count": Int64,
    "rating_count": Int64,
    "popularity_total": Int64,
    "popularity_decayed": Float64,
    "popularity_time": Float64,
    "mean_rating": Float64,
    "last_event_time": Float64,
}

# Features live as long as the online store keeps them (Redis: feast.redis_key_ttl_s); the view's
# ttl only bounds offline point-in-time joins.
VIEW_TTL = timedelta(days=365)


def objects(repo_dir: Path) -> list:
    """Every Feast object of the repository; the views' batch sources are the offline log's folders under
    ``repo_dir/offline``."""
    repo_dir = Path(repo_dir)
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
                  description="an end user of the recommending app")
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING,
                  description="a catalogue item")

    def push_source(name: str) -> PushSource:
        # the folder the stream's offline log appends Parquet files to (driftrec.feature_store.offline)
        batch = FileSource(
            name=f"{name}_batch",
            path=str(repo_dir / "offline" / name),
            timestamp_field="event_timestamp",
            created_timestamp_column="created",
        )
        return PushSource(name=f"{name}_push", batch_source=batch)

    user_push = push_source(USER_VIEW)
    item_push = push_source(ITEM_VIEW)
    user_view = FeatureView(
        name=USER_VIEW,
        entities=[user],
        ttl=VIEW_TTL,
        schema=[Field(name=n, dtype=t) for n, t in USER_FEATURES.items()],
        source=user_push,
        online=True,
        tags={"owner": "driftrec.features", "written_by": "driftrec.streams.agents.features"},
    )
    item_view = FeatureView(
        name=ITEM_VIEW,
        entities=[item],
        ttl=VIEW_TTL,
        schema=[Field(name=n, dtype=t) for n, t in ITEM_FEATURES.items()],
        source=item_push,
        online=True,
        tags={"owner": "driftrec.features", "written_by": "driftrec.streams.agents.features"},
    )
    user_service = FeatureService(name=USER_SERVICE, features=[user_view])
    ranking = FeatureService(name=RANKING_SERVICE, features=[user_view, item_view])
    return [user, item, user_push, item_push, user_view, item_view, user_service, ranking]
