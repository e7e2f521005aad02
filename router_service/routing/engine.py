"""The online routing engine the HTTP router calls: prompt -> ranked models.

`RoutingEngine.from_config(cfg)` does the heavy work once (load the history, fit the embedder's
IDF, embed the history through the on-disk cache, build the neighbour index, fit the initial dual
prices). After that `rank(prompt)` is cheap, synchronous and does no I/O, so it is safe to call
from the event loop: embed the prompt, find its k history neighbours, estimate every backend's
quality and token cost (`estimator`: the mean over k=50 neighbours by default), score
``alpha * d - gamma * g`` and sort.

Costs are tokens. A backend's columns in the history are chosen by its ``profile``; its token cost
for a query is the query's own prompt tokens (chars / 4, known exactly) plus the neighbours'
estimate of its completion tokens for that profile. A calibrated backend (`calibrations`, pushed by
`tollway calibrate`) is described by its own measurements wherever it was measured
(`routing.calibrated`); the profile remains its prior elsewhere. Budgets (`BudgetConfig.tokens`) are tokens per window per backend, so
gamma_i prices one token of backend i: a backend's per-token price only matters through how the
operator splits budgets.

Warm-up. PORT routes its first ceil(eps x N) queries uniformly at random and drops them (the
paper's evaluation). A product must serve them, so:
- ``algorithm: tollway`` starts with prices fitted on the history itself (leave-one-out neighbour
  estimates of up to 2,000 history entries, budgets scaled to the expected volume), i.e. warm-up
  queries are already routed by the full rule; after ceil(eps x N) queries the prices are re-fitted
  on live traffic, then every ``learning.refitEvery`` queries against the remaining budget and the
  remaining expected queries of the window.
- ``algorithm: port`` ranks warm-up queries in a uniformly random order (the router still serves
  the first candidate the budget admits) and fits gamma once after the warm-up, as published.
Fits run on a background thread (one at a time) so `rank` never waits for the LP solver.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from router_service.config import RouterConfig
from router_service.routing.ann import NeighbourIndex
from router_service.routing.calibrated import applicable, fingerprint, join_calibrations
from router_service.routing.duals import DualController
from router_service.routing.embedding import Embedder, EmbeddingCache, fit_to_history, make_embedder
from router_service.routing.estimator import NeighbourEstimator, choose_k_by_leave_one_out
from router_service.routing.history import CHARS_PER_TOKEN, History, load_builtin_history, load_history
from router_service.routing.ledger import BudgetLedger
from router_service.routing.policy import Candidate, rank
from router_service.store.base import Calibration, LearnedEntry

log = logging.getLogger(__name__)

PRIOR_SAMPLE = 2000
HISTORY_DIR_ENV = "TOLLWAY_HISTORY_DIR"
DEFAULT_HISTORY_DIR = "/etc/tollway/history"

__all__ = ["Candidate", "Ranking", "RoutingEngine", "load_configured_history"]


@dataclass(frozen=True, slots=True)
class Ranking:
    """Every backend for one prompt, best first."""

    candidates: list[Candidate]
    phase: Literal["warmup", "routed"]
    decision_seconds: float
    """Wall time of the whole decision, embedding included."""
    reject: bool = False
    """True when the best score is below objective.rejectBelow (never for priority 'critical')."""
    prompt_tokens: float = 0.0
    gamma: dict[str, float] = field(default_factory=dict)


def _history_from_dir(directory: Path) -> Path:
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz", ".csv"))
    )
    if not files:
        raise FileNotFoundError(f"history.configMap: no .jsonl, .jsonl.gz or .csv file in {directory}")
    return files[0]


def load_configured_history(cfg: RouterConfig) -> History:
    """The history a RouterConfig names (builtin / path / configMap mount / url)."""
    h = cfg.history
    if h.builtin:
        return load_builtin_history("history")
    if h.path:
        return load_history(h.path)
    if h.config_map:
        directory = Path(os.environ.get(HISTORY_DIR_ENV, DEFAULT_HISTORY_DIR))
        if not directory.is_dir():
            raise FileNotFoundError(
                f"history.configMap {h.config_map!r}: expected it mounted at {directory} (set {HISTORY_DIR_ENV})"
            )
        return load_history(_history_from_dir(directory))
    assert h.url is not None
    import hashlib

    import httpx

    from router_service.routing.embedding import cache_dir

    name = h.url.rsplit("/", 1)[-1] or "history.jsonl"
    target = cache_dir() / "history" / hashlib.sha256(h.url.encode()).hexdigest()[:16] / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with httpx.Client(timeout=60, follow_redirects=True) as client:
        resp = client.get(h.url)
    if resp.status_code != 200:
        raise RuntimeError(f"history.url {h.url!r}: HTTP {resp.status_code}")
    target.write_bytes(resp.content)
    return load_history(target)


class RoutingEngine:
    """Ranks backends for prompts; keeps the dual prices up to date."""

    def __init__(
        self,
        *,
        backends: list[str],
        history: History,
        embedder: Embedder,
        history_vectors: np.ndarray,
        cfg: RouterConfig,
        ledger: BudgetLedger | None = None,
        background_fits: bool = True,
        seed: int = 0,
    ) -> None:
        self.cfg = cfg
        self.backends = list(backends)
        self.embedder = embedder
        self.alpha = cfg.objective.alpha
        self.algorithm = cfg.objective.algorithm
        self.reject_below = cfg.objective.reject_below
        self.ledger = ledger
        self.background_fits = background_fits
        self._rng = np.random.default_rng(seed)
        self._history = history  # columns = backends' profiles, in backend order
        prompt_tokens = history.prompt_tokens
        completion = history.completion_tokens
        index = NeighbourIndex.build(history_vectors, cfg.ann)
        self.estimator = NeighbourEstimator(index, history.scores, completion, cfg.ann.k, cfg.estimator)
        self.k_errors: dict[int, float] = {}
        if cfg.estimator.choose_k:
            self.estimator.k, self.k_errors = choose_k_by_leave_one_out(self.estimator, history_vectors)
            log.info(
                "estimator.chooseK: k=%d (leave-one-out squared error %s)", self.estimator.k, self.k_errors
            )
        # With a shared store every replica prices the whole budget and the whole volume.
        share = 1.0 if ledger is not None and ledger.shared else cfg.budgets.replica_share
        prior_d = prior_g = None
        if self.algorithm == "tollway":
            prior_d, prior_g = self._prior_sample(history_vectors, prompt_tokens)
        self.controller = DualController(
            self.backends,
            self.alpha,
            algorithm=self.algorithm,
            expected_queries=max(1, round(cfg.learning.expected_queries * share)),
            warmup_fraction=cfg.learning.warmup_fraction,
            refit_every=cfg.learning.refit_every,
            prior_quality=prior_d,
            prior_cost=prior_g,
        )
        self._fit_lock = threading.Lock()
        self._fit_thread: threading.Thread | None = None
        self._window = ledger.window_index if ledger is not None else 0
        self.last_fit_error: str | None = None
        self.calibration_fingerprint = ""
        """What this engine's calibrated columns come from (`routing.calibrated.fingerprint`)."""
        self.calibrated: dict[str, dict] = {}
        """Per calibrated backend: revision, dataset, lines, history rows replaced, entries added."""
        self.fleet_observed: int | None = None
        """Queries routed in this window by every replica (set by the state sync; None: only ours)."""
        if self.algorithm == "tollway":
            self.controller.fit_prior(self._full_budgets())

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        cfg: RouterConfig,
        ledger: BudgetLedger | None = None,
        *,
        history: History | None = None,
        cache: EmbeddingCache | None = None,
        background_fits: bool = True,
        calibrations: Mapping[str, Calibration] | None = None,
    ) -> RoutingEngine:
        """Load the history, join the calibrated columns (`calibrations`: the latest per backend
        name, as the state store keeps them), embed it (cached on disk), build the index, fit the
        first prices."""
        full = history if history is not None else load_configured_history(cfg)
        if len(full) == 0:
            raise ValueError("the routing history is empty")
        profiles = []
        for b in cfg.backends:
            if b.profile not in full.models:
                raise ValueError(
                    f"backends[{b.name}].profile {b.profile!r} is not a model of the routing history; "
                    f"known profiles: {full.models}"
                )
            profiles.append(b.profile)
        columns = History(
            prompts=full.prompts,
            models=[b.name for b in cfg.backends],
            scores=full.scores[:, [full.model_index(p) for p in profiles]],
            costs=full.costs[:, [full.model_index(p) for p in profiles]],
            tokens=full.tokens[:, [full.model_index(p) for p in profiles]],
            eval_names=full.eval_names,
        )
        used = applicable(calibrations or {}, cfg.backends)
        joined = join_calibrations(columns, used)
        columns = joined.history
        embedder = fit_to_history(make_embedder(cfg.embedding), columns.prompts)
        vectors = (cache or EmbeddingCache()).embed(embedder, columns.prompts)
        engine = cls(
            backends=[b.name for b in cfg.backends],
            history=columns,
            embedder=embedder,
            history_vectors=vectors,
            cfg=cfg,
            ledger=ledger,
            background_fits=background_fits,
        )
        engine.add_learned(joined.extra)  # calibrated prompts the history lacks
        engine.calibration_fingerprint = fingerprint(used, cfg.backends)
        engine.calibrated = {
            name: {
                "revision": c.revision,
                "dataset": c.dataset,
                "lines": len(c.rows),
                "history_rows_replaced": joined.matched.get(name, 0),
                "entries_added": joined.added.get(name, 0),
            }
            for name, c in sorted(used.items())
        }
        if used:
            log.info(
                "routing with calibrated columns for %s (the others keep their profile's)",
                ", ".join(sorted(used)),
            )
        return engine

    def calibration_outdated(self, calibrations: Mapping[str, Calibration]) -> bool:
        """Whether `calibrations` (the store's) would route this engine's backends differently:
        then the router builds a new engine with them."""
        return fingerprint(calibrations, self.cfg.backends) != self.calibration_fingerprint

    def _prior_sample(self, vectors: np.ndarray, prompt_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(vectors)
        rows = np.sort(self._rng.permutation(n)[: min(n, PRIOR_SAMPLE)])
        d, g = self.estimator.estimate_ids(*self.estimator.neighbours(vectors[rows], exclude=rows))
        return d, g + prompt_tokens[rows, None]

    def attach_ledger(self, ledger: BudgetLedger) -> None:
        """Use `ledger` for budgets from now on (re-fits read its remaining budget)."""
        self.ledger = ledger
        self._window = ledger.window_index

    # -- budgets --------------------------------------------------------------------------------

    def _full_budgets(self) -> np.ndarray:
        if self.ledger is not None:
            return np.array([self.ledger.budget(m) for m in self.backends], dtype=np.float64)
        b = self.cfg.budgets
        return np.array(
            [float(b.tokens[m]) * b.replica_share if m in b.tokens else math.inf for m in self.backends]
        )

    def _remaining_budgets(self) -> np.ndarray:
        if self.ledger is not None:
            return np.array([self.ledger.remaining(m) for m in self.backends], dtype=np.float64)
        return self._full_budgets()

    # -- hot path -------------------------------------------------------------------------------

    @property
    def gamma(self) -> dict[str, float]:
        return self.controller.gamma_dict()

    @property
    def phase(self) -> Literal["warmup", "routed"]:
        return self.controller.phase

    def estimate(self, prompt: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(quality [backends], tokens [backends], prompt tokens) for one prompt."""
        vec = self.embedder.embed([prompt])[0]
        d, completion = self.estimator.estimate_one(vec)
        prompt_tokens = len(prompt) / CHARS_PER_TOKEN
        return d, completion + prompt_tokens, prompt_tokens

    def rank(self, prompt: str, priority: str | None = None) -> Ranking:
        """All backends best-first for this prompt (sync, no I/O)."""
        t0 = time.perf_counter()
        d, g, prompt_tokens = self.estimate(prompt)
        self._check_window()
        phase = self.controller.phase
        gamma = self.controller.gamma
        if self.algorithm == "port" and phase == "warmup":
            order = self._rng.permutation(len(self.backends))
            candidates = [
                Candidate(self.backends[i], float(self.alpha * d[i]), float(d[i]), float(g[i])) for i in order
            ]
        else:
            candidates = rank(self.backends, d, g, gamma, self.alpha)
        if self.controller.observe(d, g):
            self._schedule_fit()
        reject = (
            self.reject_below is not None
            and priority != "critical"
            and bool(candidates)
            and candidates[0].score < self.reject_below
        )
        return Ranking(
            candidates=candidates,
            phase=phase,
            decision_seconds=time.perf_counter() - t0,
            reject=reject,
            prompt_tokens=prompt_tokens,
            gamma=self.controller.gamma_dict(),
        )

    def _check_window(self) -> None:
        if self.ledger is None:
            return
        window = self.ledger.window_index
        if window != self._window:
            self._window = window
            self.fleet_observed = None
            self.controller.reset_window()

    # -- fitting --------------------------------------------------------------------------------

    def fit_duals(self, budget_tokens: Mapping[str, float] | None = None) -> dict[str, float]:
        """Fit gamma now (synchronously) and return it. ``budget_tokens``: the budgets to fit
        against (remaining ones for tollway); default: the ledger's (or the config's)."""
        if budget_tokens is not None:
            remaining = np.array([float(budget_tokens.get(m, math.inf)) for m in self.backends])
            full = remaining
        else:
            remaining, full = self._remaining_budgets(), self._full_budgets()
        with self._fit_lock:
            self.controller.fit(remaining, full, remaining_queries=self._remaining_queries())
        return self.gamma

    def _remaining_queries(self) -> float:
        """Expected queries left in this budget window: the larger of what the count says
        (N - seen, by every replica when the state store shares the count) and what the clock says
        (N x time left); the larger one is the cautious one."""
        n = self.controller.expected_queries
        by_count = n - max(self.controller.observed, self.fleet_observed or 0)
        if self.ledger is None:
            return max(by_count, 1)
        by_time = n * (1.0 - self.ledger.window_elapsed_fraction())
        return max(by_count, by_time, 1.0)

    def _fit_safely(self) -> None:
        try:
            self.fit_duals()
            self.last_fit_error = None
        except Exception as exc:  # keep routing with the old prices
            self.last_fit_error = str(exc)
            log.exception("dual price fit failed; keeping the previous prices")

    def _schedule_fit(self) -> None:
        if not self.background_fits:
            self._fit_safely()
            return
        if self._fit_thread is not None and self._fit_thread.is_alive():
            return  # one at a time; the next due point fits again
        self._fit_thread = threading.Thread(target=self._fit_safely, name="tollway-dual-fit", daemon=True)
        self._fit_thread.start()

    def wait_for_fit(self, timeout: float = 30.0) -> None:
        thread = self._fit_thread
        if thread is not None:
            thread.join(timeout)

    def close(self) -> None:
        """Wait for a running fit to finish (call on shutdown)."""
        self.wait_for_fit()

    def set_replica_share(self, share: float) -> None:
        """This replica's share of the budgets changed (the router was scaled; in-process store):
        expect that share of the volume. With a shared store the whole volume is priced anyway."""
        if self.ledger is not None and self.ledger.shared:
            share = 1.0
        self.controller.set_expected_queries(max(1, round(self.cfg.learning.expected_queries * share)))

    # -- dual prices fitted elsewhere ------------------------------------------------------------

    @property
    def local_fits(self) -> int:
        """Fits this engine ran itself (the state sync publishes each one)."""
        return self.controller.fits

    def adopt_gamma(self, gamma: Mapping[str, float]) -> None:
        """Route with prices another replica fitted (the newest published fit wins)."""
        self.controller.adopt(dict(gamma))

    # -- learning from traffic ------------------------------------------------------------------

    def make_learned(
        self, prompt: str, model: str, score: float, tokens: float | None = None
    ) -> LearnedEntry:
        """The history entry for a served query with observed quality: the observed score (and
        tokens, when given) for `model`, this engine's current estimates for the other backends.
        Raises KeyError for an unknown backend, ValueError for a score outside [0, 1]."""
        if model not in self.backends:
            raise KeyError(f"feedback for unknown backend {model!r}; backends are {self.backends}")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"feedback score must be within [0, 1], got {score}")
        vec = self.embedder.embed([prompt])
        d, completion = self.estimator.estimate_one(vec[0])
        j = self.backends.index(model)
        d = d.copy()
        completion = completion.copy()
        d[j] = score
        if tokens is not None:
            completion[j] = max(0.0, float(tokens) - len(prompt) / CHARS_PER_TOKEN)
        return LearnedEntry(
            prompt=prompt,
            quality={m: float(v) for m, v in zip(self.backends, d, strict=True)},
            completion={m: float(v) for m, v in zip(self.backends, completion, strict=True)},
            uid=uuid.uuid4().hex,
        )

    def add_learned(self, entries: list[LearnedEntry]) -> int:
        """Add history entries (from this replica or another) to the neighbour index. A backend an
        entry does not name (added to the pool since) gets this engine's estimate for it."""
        if not entries:
            return 0
        vectors = self.embedder.embed([e.prompt for e in entries])
        quality = np.empty((len(entries), len(self.backends)))
        completion = np.empty_like(quality)
        for i, entry in enumerate(entries):
            missing = [m for m in self.backends if m not in entry.quality or m not in entry.completion]
            est_d = est_c = None
            if missing:
                est_d, est_c = self.estimator.estimate_one(vectors[i])
            for j, m in enumerate(self.backends):
                quality[i, j] = entry.quality[m] if m in entry.quality else est_d[j]  # type: ignore[index]
                completion[i, j] = entry.completion[m] if m in entry.completion else est_c[j]  # type: ignore[index]
        self.estimator.add(vectors, quality, completion)
        return len(entries)

    # -- introspection --------------------------------------------------------------------------

    @property
    def history_size(self) -> int:
        return len(self.estimator)

    def status(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "phase": self.phase,
            "gamma": self.gamma,
            "observed_queries": self.controller.observed,
            "warmup_queries": self.controller.warmup_queries,
            "fits": self.controller.fits,
            "gamma_adopted": self.controller.adopted,
            "fleet_observed_queries": self.fleet_observed,
            "history_size": self.history_size,
            "calibrated": self.calibrated,
            "columns": {
                b.name: "calibrated" if b.name in self.calibrated else b.profile for b in self.cfg.backends
            },
            "index": self.estimator.index.kind,
            "k": self.estimator.k,
            "embedder": self.embedder.name,
            "last_fit_error": self.last_fit_error,
        }
