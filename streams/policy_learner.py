"""The ranking policy's learner process: the fusion learns beside the worker, not in its interpreter.

Learning one interaction costs the policy ~0.4-0.7 ms of Python at full setting (ranking the whole
catalogue for the user's hard negatives, the knowledge model's forward, the fusion's pairwise updates),
taking the state into the candidate sources ~0.03 ms. In the worker's own process the first part
competes with ingest and with every request for the one core a Python process has (its GIL), so at a
few thousand events a second either the requests or the learning fall behind (README, "Benchmarks").

With ``ranking.learner: process`` (the default) the work is split:

* the **worker** keeps a serving copy of the policy and takes every interaction into its state only
  (:meth:`RankingPolicy.follow_many <driftrec.model.ranking.policy.RankingPolicy.follow_many>`), so the
  candidates and features a request sees are as fresh as with in-process learning;
* a **learner process** (this module's :func:`_learn_main`, a ``spawn`` child of the worker at nice 10:
  it takes the CPU the worker leaves, never the other way round) keeps a second copy built from the same
  catalogue, graph and knowledge model and observes the same interactions, item arrivals and model swaps
  in the same order (one ordered pipe), learning the fusion as the replay does;
* after each batch it sends the fusion back (a pickled
  :class:`~driftrec.model.ranking.corrections.RiverCorrector`, ~4 KB) with the count of interactions it
  covers, at once when it has caught up and at least every ``SHIP_INTERVAL_S`` while it is behind; the
  worker ranks with it from then on.

When both copies have seen the same events they are the same policy (the fusion is the only part that
learning changes beyond the state), so the worker ranks exactly as the replay does; in between, the
fusion the worker ranks with lags by what the learner has not learnt yet (``driftrec_ranking_backlog``).
If the learner process dies the worker logs it, counts it (``driftrec_ranking_learner_exits_total``) and
learns in its own process from then on (``ranking.learner: thread``), so nothing stops.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import threading
import time
from collections import deque
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

SHIP_INTERVAL_S = 0.25  # the longest a backlogged learner goes without sending its fusion back
BATCH = 256  # interactions the learner takes from its pipe before it ships (at most)
CHUNK = 64  # interactions per observe_many (their knowledge-model forwards batched)

Event = tuple  # (user, item, rating or None, event time)


class LearnerProcess:
    """The worker's side of the learner process: an ordered outbox (a sender thread writes it to the pipe,
    so a learner that falls behind never blocks the caller) and a receiver thread that hands each fusion
    to ``on_fusion(corrector, learnt)`` and calls ``on_exit(exitcode)`` if the process goes away."""

    def __init__(self, init: Mapping[str, Any], *, on_fusion: Callable[[Any, int], None],
                 on_exit: Callable[[int | None], None]) -> None:
        self._init = dict(init)
        self.on_fusion = on_fusion
        self.on_exit = on_exit
        self._outbox: deque = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.proc = None

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the process (a fresh interpreter: the worker runs threads, so it is not forked) and the
        two threads; returns at once, the child builds its policy in the background."""
        ctx = multiprocessing.get_context("spawn")
        to_child, child_in = ctx.Pipe(duplex=False)  # (reader, writer): child_in is the worker's end
        child_out, from_child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_learn_main, name="driftrec-policy-learner", daemon=True,
                                args=(to_child, from_child, self._init))
        self.proc.start()
        to_child.close()
        from_child.close()
        self._send_conn, self._recv_conn = child_in, child_out
        threading.Thread(target=self._sender, name="driftrec-learner-send", daemon=True).start()
        threading.Thread(target=self._receiver, name="driftrec-learner-recv", daemon=True).start()
        log.info("policy learner process %s started", self.proc.pid)

    def stop(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- what the learner must see, in the worker's order --------------------------------------------
    def events(self, events: Sequence[Event]) -> None:
        self._put(("events", list(events)))

    def item(self, item) -> None:
        self._put(("item", item))

    def model(self, folder: str | None) -> None:
        self._put(("model", folder))

    def _put(self, message) -> None:
        with self._cv:
            self._outbox.append(message)
            self._cv.notify()

    # -- threads ------------------------------------------------------------------------------------
    def _sender(self) -> None:
        conn = self._send_conn
        while True:
            with self._cv:
                while not self._outbox and not self._closed:
                    self._cv.wait()
                if self._closed:
                    break
                batch = list(self._outbox)
                self._outbox.clear()
            try:
                for message in _coalesced(batch):
                    conn.send(message)  # blocks while the learner's pipe is full: only this thread waits
            except (BrokenPipeError, OSError):
                break  # the receiver sees the exit
        try:
            conn.close()
        except OSError:
            pass

    def _receiver(self) -> None:
        conn = self._recv_conn
        while True:
            try:
                kind, *rest = conn.recv()
            except (EOFError, OSError):
                break
            if kind == "fusion":
                blob, learnt = rest
                try:
                    corrector = pickle.loads(blob)
                except Exception:  # noqa: BLE001 - keep the fusion the worker has
                    log.exception("the policy learner sent a fusion that does not load")
                    continue
                self.on_fusion(corrector, learnt)
            elif kind == "ready":
                log.info("policy learner process %s ready (%s)", self.pid, rest[0])
        if self.proc is not None:
            self.proc.join(timeout=5)
        with self._cv:
            closed = self._closed
            self._closed = True
            self._cv.notify()
        if not closed:
            self.on_exit(self.proc.exitcode if self.proc is not None else None)


def _coalesced(messages: list) -> list:
    """Consecutive ``events`` messages as one (fewer, larger sends; the order is kept). Each message's
    event list is its own (``events`` copies), so it is extended in place."""
    out: list = []
    for m in messages:
        if m[0] == "events" and out and out[-1][0] == "events":
            out[-1][1].extend(m[1])
        else:
            out.append(m)
    return out


def learner_init(cfg, items: Mapping[str, Any], item_ids: Sequence[str], *, model_folder: str | None,
                 model_path: str | None, kg_path: str | None) -> dict[str, Any]:
    """What the learner builds its copy of the policy from (picklable): the policy config, the catalogue in
    the serving policy's order, the knowledge model's checkpoint folder (or None) and the graph's path."""
    return {"cfg": cfg, "items": dict(items), "item_ids": list(item_ids), "model_folder": model_folder,
            "model_path": model_path, "kg_path": kg_path}


def policy_graph(kg_path: str | None, items: Mapping[str, Any], positive_threshold: float):
    """The knowledge graph at ``kg_path`` linked to the catalogue ``items``, as the policy's candidate
    source (None without a path): what the worker's policy and its learner's copy are both built with."""
    from driftrec.model.knowledge.candidates import KGCandidates
    from driftrec.model.knowledge.graph import load_catalogue_graph

    kg = load_catalogue_graph(kg_path, items)
    return KGCandidates(kg, positive_threshold=positive_threshold) if kg is not None else None


def build_learner_policy(init: Mapping[str, Any]):
    """The learner's copy of the policy, from :func:`learner_init`'s dict."""
    from driftrec.model.ranking.policy import RankingPolicy

    cfg, items = init["cfg"], init["items"]
    model = _load_model(init["model_folder"], items, init["model_path"])
    graph = policy_graph(init["kg_path"], items, cfg.positive_threshold)
    return RankingPolicy(cfg, items, init["item_ids"], model=model, kg=graph)


def _load_model(folder: str | None, items: Mapping[str, Any], model_path: str | None):
    if folder is None:
        return None
    from driftrec.model.knowledge.checkpoint import load_knowledge

    return load_knowledge(folder, items, model_path)


def _learn_main(inbox, outbox, init: Mapping[str, Any]) -> None:  # pragma: no cover - runs in the child
    """The learner process: build the policy, then observe what arrives, in order, and ship the fusion."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [learner] %(name)s: %(message)s")
    try:
        os.nice(10)  # the worker's ingest and requests come first
    except OSError:
        pass
    import torch  # (numpy's BLAS threads: OPENBLAS_NUM_THREADS, inherited from the worker's environment)

    torch.set_num_threads(1)
    policy = build_learner_policy(init)
    outbox.send(("ready", f"{len(policy.item_ids)} items, model {init['model_folder'] or 'none'}"))
    learnt = shipped = 0
    last_ship = time.monotonic()
    held = None  # a message read while batching events, handled next
    while True:
        if held is not None:
            message, held = held, None
        else:
            try:
                message = inbox.recv()
            except (EOFError, OSError):
                return  # the worker is gone
        kind = message[0]
        if kind == "events":
            batch = list(message[1])
            while len(batch) < BATCH and inbox.poll():
                try:
                    nxt = inbox.recv()
                except (EOFError, OSError):
                    return
                if nxt[0] == "events":
                    batch.extend(nxt[1])
                else:
                    held = nxt
                    break
            for a in range(0, len(batch), CHUNK):
                _observe(policy, batch[a:a + CHUNK])
            learnt += len(batch)
        elif kind == "item":
            policy.add_item(message[1].item_id, message[1])
        elif kind == "model":
            try:
                policy.set_model(_load_model(message[1], policy.state.items, init["model_path"]))
            except Exception:  # noqa: BLE001 - the worker verified it; keep learning with the old one
                logging.getLogger(__name__).exception("the learner could not load model %s", message[1])
        if learnt != shipped and (held is None and not inbox.poll() or time.monotonic() - last_ship >= SHIP_INTERVAL_S):
            try:
                outbox.send(("fusion", pickle.dumps(policy.corrector), learnt))
            except (BrokenPipeError, OSError):
                return
            shipped, last_ship = learnt, time.monotonic()


def _observe(policy, events: Sequence[Event]) -> None:  # pragma: no cover - runs in the child
    try:
        policy.observe_many(events)
    except Exception:  # noqa: BLE001 - one bad chunk must not stop learning: its events one by one
        logging.getLogger(__name__).exception("the learner failed on a chunk of events; observing them one by one")
        for ev in events:
            try:
                policy.observe(*ev)
            except Exception:  # noqa: BLE001
                logging.getLogger(__name__).exception("the learner failed to learn an event")
