"""Leader election on a `coordination.k8s.io/v1` Lease, so that of the extender's replicas
exactly one answers the verbs and binds (two binding at once could double-book a unit).

The protocol is client-go's (k8s.io/client-go/tools/leaderelection), on the official client:

- read the Lease; none -> create it holding it (409 AlreadyExists: someone was faster);
- held by another and its record changed less than `lease_duration_s` ago *as observed on our
  own clock* (never the holder's renewTime: clocks differ) -> stand by;
- else (ours, expired, or released) -> replace it with our identity, the resourceVersion read
  being the precondition (409 Conflict: someone else wrote first; we lost this round).

Leadership is judged locally and lazily: `holds_lease()` is true only while the last successful
renew *started* less than `renew_deadline_s` ago, so a leader whose renewals fail (API server
unreachable, partition) stops binding at that deadline even if its thread is stuck in a call.
Because `renew_deadline_s` < `lease_duration_s`, a rival can take the Lease only after the old
leader has stopped: `lease_left()` is what a bind in flight may still use (KubeBinder caps its
request timeout to it)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("copack.extender.leader")

# Slack kept between the end of a bind's request budget and the earliest moment a rival can
# hold the Lease (a timed-out request may still be processed by the API server a bit later).
SAFETY_MARGIN_S = 1.0


def micro_time(t: datetime | None = None) -> datetime:
    """A time the API server can parse as MicroTime (RFC 3339 with exactly 6 fractional digits).
    The client serializes datetimes with isoformat(), which drops the fraction when the
    microseconds are 0; a 1 µs nudge keeps the 6 digits."""
    t = t or datetime.now(UTC)
    return t.replace(microsecond=1) if t.microsecond == 0 else t


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return micro_time(datetime.fromisoformat(text))
    except ValueError:
        return None


class Leadership(Protocol):
    """What the HTTP app asks (extender/app.py): may this replica answer the verbs now, and if
    not, why (the body of its 503s)."""

    def is_leader(self) -> bool: ...

    def standby_reason(self) -> str: ...


@dataclass(frozen=True)
class LeaseRecord:
    """What the Lease says, as read (raw JSON)."""

    holder: str
    duration_s: int
    transitions: int
    acquire_time: str | None
    renew_time: str | None
    resource_version: str

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LeaseRecord:
        spec = obj.get("spec") or {}
        meta = obj.get("metadata") or {}
        return cls(
            holder=spec.get("holderIdentity") or "",
            duration_s=int(spec.get("leaseDurationSeconds") or 0),
            transitions=int(spec.get("leaseTransitions") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            resource_version=str(meta.get("resourceVersion") or ""),
        )


class LeaderElector:
    """Acquires and renews the Lease in a thread; see the module docstring.

    `on_started_leading(term)` runs in its own thread each time leadership is (re)gained (term
    counts acquisitions); `on_stopped_leading()` runs in the elector's thread when it is lost."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        *,
        name: str,
        namespace: str,
        identity: str,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        on_started_leading: Callable[[int], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not retry_period_s < renew_deadline_s < lease_duration_s:
            raise ValueError("need retry_period_s < renew_deadline_s < lease_duration_s")
        self._api = k8s.CoordinationV1Api(api_client)
        self.name, self.namespace, self.identity = name, namespace, identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._clock = clock
        self._lock = threading.Lock()
        self._leading = False
        self._renewed_at = -float("inf")  # clock() when the last successful renew started
        self.term = 0
        self.observed: LeaseRecord | None = None
        self._observed_at = -float("inf")  # clock() when the observed record last changed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the rest of the extender asks ----------------------------------------------------

    def holds_lease(self) -> bool:
        with self._lock:
            return self._leading and self._clock() - self._renewed_at < self.renew_deadline_s

    def lease_left(self) -> float:
        """Seconds a write made now may take and still land before any rival can hold the
        Lease; 0 when we do not hold it."""
        with self._lock:
            now = self._clock()
            if not self._leading or now - self._renewed_at >= self.renew_deadline_s:
                return 0.0
            return max(0.0, self._renewed_at + self.lease_duration_s - SAFETY_MARGIN_S - now)

    def leader(self) -> str | None:
        """Who holds the Lease: ourselves while we do, else the holder last read; None when
        nobody does or when all we know is our own lapsed term (renewals failing)."""
        if self.holds_lease():
            return self.identity
        rec = self.observed
        if rec is None or not rec.holder or rec.holder == self.identity:
            return None
        return rec.holder

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LeaderElector:
        self._thread = threading.Thread(target=self._run, name="copack-leader", daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = True) -> None:
        """Stop renewing; with `release`, hand the Lease over at once (a rival need not wait
        for it to expire). Without it, the Lease expires as after a crash."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        was_leading = self.holds_lease()
        self._lose()
        if release and was_leading:
            with contextlib.suppress(Exception):
                self._release()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.try_acquire_or_renew()
            except Exception as e:  # an API error, a dropped connection: retry next period
                log.info("lease %s/%s: %s: %s", self.namespace, self.name, type(e).__name__, e)
            if self._leading and not self.holds_lease():
                log.warning("lease %s/%s not renewed within %.1fs: no longer the leader",
                            self.namespace, self.name, self.renew_deadline_s)
                self._lose()
            self._stop.wait(self.retry_period_s)

    def _lose(self) -> None:
        with self._lock:
            was, self._leading = self._leading, False
        if was and self._on_stopped is not None:
            self._on_stopped()

    # -- one round ------------------------------------------------------------------------------

    def _timeout(self) -> float:
        return max(0.5, min(self.retry_period_s, self.renew_deadline_s / 2))

    def _body(self, rec: LeaseRecord | None, acquire: bool) -> k8s.V1Lease:
        now = micro_time()
        transitions = rec.transitions if rec is not None else 0
        if rec is not None and acquire and rec.holder != self.identity:
            transitions += 1
        return k8s.V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=k8s.V1ObjectMeta(
                name=self.name, namespace=self.namespace,
                resource_version=rec.resource_version if rec is not None else None,
            ),
            spec=k8s.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=max(1, round(self.lease_duration_s)),
                acquire_time=now if acquire or rec is None else _parse_time(rec.acquire_time),
                renew_time=now,
                lease_transitions=transitions,
            ),
        )

    def try_acquire_or_renew(self) -> bool:
        """One round of the protocol; True when we hold the Lease after it."""
        started = self._clock()
        try:
            raw = self._api.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False,
                _request_timeout=self._timeout(),
            )
            rec: LeaseRecord | None = LeaseRecord.from_json(orjson.loads(raw.data))
        except ApiException as e:
            if e.status != 404:
                raise
            rec = None
        if rec is None:
            try:
                self._api.create_namespaced_lease(
                    self.namespace, self._body(None, acquire=True), _preload_content=False,
                    _request_timeout=self._timeout(),
                )
            except ApiException as e:
                if e.status == 409:  # created by a rival since our read
                    return False
                raise
            return self._won(started, None)
        self._observe(rec, started)
        mine = rec.holder == self.identity
        if not mine and self._leading:  # taken over (or released by hand): stop at once
            log.warning("lease %s/%s is held by %r now: no longer the leader",
                        self.namespace, self.name, rec.holder)
            self._lose()
        if rec.holder and not mine:
            expired = started - self._observed_at >= max(rec.duration_s, 1)
            if not expired:
                return False
        acquire = not mine or not self._leading
        try:
            self._api.replace_namespaced_lease(
                self.name, self.namespace, self._body(rec, acquire=acquire),
                _preload_content=False, _request_timeout=self._timeout(),
            )
        except ApiException as e:
            if e.status == 409:  # someone wrote the Lease since our read
                return False
            raise
        return self._won(started, rec)

    def _observe(self, rec: LeaseRecord, now: float) -> None:
        old = self.observed
        if old is None or (old.holder, old.renew_time, old.resource_version) != (
            rec.holder, rec.renew_time, rec.resource_version
        ):
            self.observed, self._observed_at = rec, now

    def _won(self, started: float, previous: LeaseRecord | None) -> bool:
        with self._lock:
            newly = not self._leading
            self._leading, self._renewed_at = True, started
            if newly:
                self.term += 1
            term = self.term
        self.observed = LeaseRecord(self.identity, round(self.lease_duration_s),
                                    previous.transitions if previous else 0, None, None, "")
        if newly:
            log.info("lease %s/%s acquired by %s (term %d)", self.namespace, self.name,
                     self.identity, term)
            if self._on_started is not None:
                threading.Thread(target=self._on_started, args=(term,), daemon=True,
                                 name="copack-leader-started").start()
        return True

    def _release(self) -> None:
        """Give the Lease up (holder cleared, 1 s duration), only if it is still ours."""
        raw = self._api.read_namespaced_lease(self.name, self.namespace, _preload_content=False,
                                              _request_timeout=self._timeout())
        rec = LeaseRecord.from_json(orjson.loads(raw.data))
        if rec.holder != self.identity:
            return
        body = self._body(rec, acquire=False)
        assert body.spec is not None
        body.spec.holder_identity = None
        body.spec.lease_duration_seconds = 1
        self._api.replace_namespaced_lease(self.name, self.namespace, body,
                                           _preload_content=False,
                                           _request_timeout=self._timeout())
        log.info("lease %s/%s released by %s", self.namespace, self.name, self.identity)
