"""Which replica of a model serves a request: filter -> score -> pick, in the style of the Gateway API
Inference Extension's endpoint picker, and the model's load verdict that follows from it.

Candidates are (model, replica): `dispatch.choose` walks the models best-ranked first and asks
each for its verdict, which is its *best replica's*. So a model with one hot and one idle replica
is not degraded: the idle one serves. The steps, each a small function of the replicas' load as
`load.ReplicaLoad` holds it (nothing here changes state or does I/O):

1. filter   `with_room`: replicas that can take the request (circuit closed, not saturated for its
            priority: `load.assess` per replica). Replicas that are not ready (terminating, gone)
            never get here: they are not in the model's endpoint set.
2. prefer   `FREE_SLOT` then `FRESH`: filters that keep the replicas with a free sequence slot, then
            those with fresh metrics, each only when it leaves someone. A replica whose metrics are
            unknown (failed or stale scrape) is taken only when no replica with fresh metrics has
            room: unknown is never read as idle.
3. score    `running_score`, `queue_score`, `kv_cache_score`: the room left on a replica in [0, 1]
            (1 = idle), normalised by its limits; `score` is their weighted mean
            (`endpointPicker.weights`).
4. pick     `pick_most_room`: the highest score; on a tie the replica picked longest ago, so equal
            replicas take turns. `pick_round_robin` and `pick_random` are what a Kubernetes Service
            does (every ready replica in turn, or at random, load ignored), for comparison
            (`endpointPicker.strategy`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from router_service.config import DegradationSettings, EndpointPickerSettings, ScorerWeights
from router_service.proxy.load import CIRCUIT_OPEN, LoadVerdict, ReplicaLoad, ScrapedLoad, assess

UNAVAILABLE = LoadVerdict(available=False, saturated=True, reason="unavailable", pressure=math.inf)
CIRCUIT_OPEN_VERDICT = LoadVerdict(available=False, saturated=True, reason=CIRCUIT_OPEN, pressure=math.inf)


@dataclass(frozen=True, slots=True)
class Option:
    """One replica as a candidate for one request."""

    replica: ReplicaLoad
    verdict: LoadVerdict
    fresh: ScrapedLoad | None  # its scraped load, None when unknown
    max_num_seqs: int | None


Filter = Callable[[list[Option]], list[Option]]
Scorer = Callable[[Option, DegradationSettings], float]


# --- 1-2. filters -------------------------------------------------------------------------------


def with_room(options: list[Option]) -> list[Option]:
    """The replicas that can take one more request of this priority."""
    return [o for o in options if o.verdict.can_serve]


def prefer(keep: Callable[[Option], bool]) -> Filter:
    """A filter that keeps the options `keep` accepts, or all of them when it accepts none."""

    def step(options: list[Option]) -> list[Option]:
        kept = [o for o in options if keep(o)]
        return kept or options

    return step


FREE_SLOT = prefer(lambda o: not o.verdict.queues)
FRESH = prefer(lambda o: o.fresh is not None)
PREFERENCES: tuple[Filter, ...] = (FREE_SLOT, FRESH)


# --- 3. scorers (1 = all room left, 0 = none) ---------------------------------------------------


def running_score(o: Option, settings: DegradationSettings) -> float:
    """Sequence slots left: the requests on the replica (the router's own in flight, or what its
    metrics say runs and waits, whichever is more) against its slots (maxNumSeqs, else
    maxInFlightPerReplica) times the servers it stands for."""
    replicas = o.replica.endpoint.replicas
    slots = (o.max_num_seqs or settings.max_in_flight_per_replica) * replicas
    busy = float(o.replica.in_flight)
    if o.fresh is not None:
        busy = max(busy, o.fresh.running + o.fresh.waiting)
    return 1.0 - min(1.0, busy / slots)


def queue_score(o: Option, settings: DegradationSettings) -> float:
    """Queue room: requests waiting on the replica (scraped, or the router's own beyond its slots)
    against maxWaitingPerReplica."""
    replicas = o.replica.endpoint.replicas
    waiting = o.fresh.waiting if o.fresh is not None else 0.0
    if o.max_num_seqs is not None:
        waiting = max(waiting, float(o.replica.in_flight - o.max_num_seqs * replicas))
    limit = settings.max_waiting_per_replica * replicas
    if limit <= 0:
        return 1.0 if waiting <= 0 else 0.0
    return 1.0 - min(1.0, max(0.0, waiting) / limit)


def kv_cache_score(o: Option, settings: DegradationSettings) -> float:
    """KV-cache room (scraped; 0 when unknown or not exported)."""
    if o.fresh is None or o.fresh.kv_usage is None:
        return 0.0
    return 1.0 - min(1.0, max(0.0, o.fresh.kv_usage))


def scorers(weights: ScorerWeights) -> tuple[tuple[Scorer, float], ...]:
    return (
        (running_score, weights.running),
        (queue_score, weights.queue),
        (kv_cache_score, weights.kv_cache),
    )


def score(o: Option, settings: DegradationSettings, weighted: Sequence[tuple[Scorer, float]]) -> float:
    """The weighted mean of the scorers (0 when every weight is 0: ties, replicas take turns)."""
    total = sum(w for _, w in weighted)
    if total <= 0:
        return 0.0
    return sum(w * fn(o, settings) for fn, w in weighted if w > 0) / total


# --- 4. pickers ---------------------------------------------------------------------------------


def pick_most_room(
    options: Sequence[Option], settings: DegradationSettings, weighted: Sequence[tuple[Scorer, float]]
) -> Option:
    """The highest score; ties go to the replica picked longest ago."""
    return max(options, key=lambda o: (round(score(o, settings, weighted), 9), -o.replica.turn))


def pick_round_robin(options: Sequence[Option]) -> Option:
    """The replica picked longest ago: every replica in turn."""
    return min(options, key=lambda o: o.replica.turn)


def pick_random(options: Sequence[Option], rng: random.Random) -> Option:
    return options[rng.randrange(len(options))]


# --- the model's verdict ------------------------------------------------------------------------


def replica_options(
    replicas: Sequence[ReplicaLoad],
    *,
    settings: DegradationSettings,
    priority: str,
    now: float,
    max_num_seqs: int | None,
    allows: Callable[[str], bool],
) -> list[Option]:
    """Each replica with its verdict for this priority (circuit breaker first, then load)."""
    options = []
    for r in replicas:
        fresh = r.fresh(now, settings.stale_after_seconds)
        if not allows(r.endpoint.url):
            verdict = CIRCUIT_OPEN_VERDICT
        else:
            verdict = assess(
                replicas=r.endpoint.replicas,
                in_flight=r.in_flight,
                scraped=fresh,
                settings=settings,
                priority=priority,
                now=now,
                max_num_seqs=max_num_seqs,
            )
        options.append(Option(r, verdict, fresh, max_num_seqs))
    return options


def _least_bad(options: list[Option]) -> LoadVerdict:
    """Why a model cannot serve: its least-pressed replica's reason, a failing replica's last."""
    return min(options, key=lambda o: (o.verdict.reason == CIRCUIT_OPEN, o.verdict.pressure)).verdict


def choose_replica(
    replicas: Sequence[ReplicaLoad],
    *,
    settings: DegradationSettings,
    picker: EndpointPickerSettings,
    priority: str,
    now: float,
    max_num_seqs: int | None,
    allows: Callable[[str], bool],
    rng: random.Random | None = None,
) -> LoadVerdict:
    """A model's verdict, its best replica's, with `endpoint` the replica that would serve.

    Unavailable without ready replicas; circuit open when every replica's circuit is; saturated
    (with the least-pressed replica's reason) when none has room. Otherwise it can serve, and
    `queues` says whether even the chosen replica would make the request wait.
    """
    if not replicas:
        return UNAVAILABLE
    options = replica_options(
        replicas, settings=settings, priority=priority, now=now, max_num_seqs=max_num_seqs, allows=allows
    )
    serving = with_room(options)
    if not serving:
        return _least_bad(options)
    for step in PREFERENCES:
        serving = step(serving)
    if picker.strategy == "least-loaded":
        chosen = pick_most_room(serving, settings, scorers(picker.weights))
        return replace(chosen.verdict, endpoint=chosen.replica.endpoint.url)
    # A Service's way: any ready replica whose circuit is closed, load ignored.
    healthy = [o for o in options if o.verdict.reason != CIRCUIT_OPEN]
    if picker.strategy == "round-robin":
        chosen = pick_round_robin(healthy)
    else:
        chosen = pick_random(healthy, rng or random.Random())
    return replace(serving[0].verdict, endpoint=chosen.replica.endpoint.url)
