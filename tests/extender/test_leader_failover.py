"""High availability, whole: three `ExtenderService`s (watchers, leader election, binder, HTTP)
against one fake API server. Exactly one leads; the standbys are Ready (warm) but answer the
verbs 503.
The leader is stopped (crashed: the Lease left to expire; or shut down: the Lease released) in
the middle of a storm of 200 pods scheduled concurrently the way kube-scheduler does (filter,
prioritize, bind over HTTP, retried on errors, through a "Service" that tries the replicas in
turn). Afterwards every pod is bound exactly once or Pending with a reason, no unit is over its
memory or its slots, and the new leader answered within the lease duration (printed)."""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial

import httpx
import orjson
import pytest

from extender.config import ExtenderConfig
from extender.serve import ExtenderService
from policies.config import PolicyConfig
from tests.fakes.kube_fixtures import FakeKube, eventually
from tests.fakes.kube_objects import (
    H100_MEMORY,
    binding_args,
    copack_pod,
    extender_args,
    gpu_node,
    gpu_units,
)

GI = 1024**3
LEASE_S, RENEW_S, RETRY_S = 3.0, 2.0, 0.25
NODES, GPUS, PODS, POD_MEM = 10, 4, 200, 16  # 4 pods of 16 GiB per GPU by memory and by slots
SLOTS = PolicyConfig().max_pods_per_unit


# The storm's waits run on a 2-core box next to three replicas: a longer default.
eventually = partial(eventually, timeout=15.0)


def _config(kube: FakeKube, identity: str) -> ExtenderConfig:
    return ExtenderConfig.model_validate({
        "listen": {"host": "127.0.0.1", "port": 0},
        "kube": {"kubeconfig": str(kube.kubeconfig), "backoff_initial_s": 0.05,
                 "backoff_max_s": 0.5},
        "telemetry": {"enabled": False},
        "leader_election": {"enabled": True, "identity": identity,
                            "lease_namespace": "copack-system",
                            "lease_duration_s": LEASE_S, "renew_deadline_s": RENEW_S,
                            "retry_period_s": RETRY_S},
    })


@pytest.fixture
def replicas(fake_kube: FakeKube) -> Iterator[list[ExtenderService]]:
    s = fake_kube.server
    for i in range(NODES):
        s.create("nodes", gpu_node(f"n{i}", gpu_units(f"n{i}", GPUS)))
    svcs = [ExtenderService(_config(fake_kube, f"ext-{i}")).start() for i in range(3)]
    try:
        eventually(lambda: all(x.state.synced for x in svcs), what="sync")
        yield svcs
    finally:
        for x in svcs:
            x.stop()


def _leaders(svcs: list[ExtenderService]) -> list[ExtenderService]:
    return [x for x in svcs if x.is_leader()]


def test_exactly_one_leader_and_standbys_answer_503(fake_kube, replicas) -> None:
    leader = eventually(lambda: _leaders(replicas), what="a leader")
    assert len(leader) == 1
    time.sleep(3 * RETRY_S)  # and it stays one
    assert _leaders(replicas) == leader
    ident = leader[0].config.leader_election.identity
    lease = fake_kube.server.get("leases", "copack-extender", "copack-system")
    assert lease is not None and lease["spec"]["holderIdentity"] == ident
    pod = fake_kube.server.add_pod(copack_pod("p0", demand=f"sm=0.1,bw=0.1,mem={POD_MEM}Gi"))
    args = orjson.dumps(extender_args({"kind": "Pod", "apiVersion": "v1", **pod}, ["n0"]))
    for x in replicas:
        with httpx.Client(base_url=x.url, timeout=5) as c:
            ready = c.get("/readyz")
            verb = c.post("/filter", content=args)
            metric = [ln for ln in c.get("/metrics").text.splitlines()
                      if ln.startswith("copack_extender_leader ")]
        if x is leader[0]:
            assert ready.status_code == 200 and verb.status_code == 200
            assert metric == ["copack_extender_leader 1.0"]
        else:
            # Ready (warm) all the same: the Service routes by the role label, not readiness
            assert ready.status_code == 200 and ready.text == f"ok; standby; leader is {ident}"
            assert verb.status_code == 503
            assert verb.json()["Error"] == f"standby; leader is {ident}"
            assert metric == ["copack_extender_leader 0.0"]


class Scheduler:
    """kube-scheduler, as far as the extender sees it: per pod, filter -> prioritize -> bind
    through a Service (the replicas tried in turn; 503 and refused connections mean "next"),
    retried with a short backoff while it fails, until bound or told to give up."""

    def __init__(self, kube: FakeKube, urls: list[str]) -> None:
        self.kube = kube
        limits = httpx.Limits(max_connections=PODS, max_keepalive_connections=PODS)
        self.clients = {u: httpx.Client(base_url=u, timeout=10, limits=limits) for u in urls}
        self.give_up = threading.Event()
        self.lock = threading.Lock()
        self.bound: dict[str, tuple[str, float]] = {}  # pod -> (replica url, when)
        self.pending: dict[str, str] = {}  # pod -> last reason
        self.refusals: list[str] = []  # bind errors answered by a replica

    def _post(self, verb: str, body: dict) -> tuple[str, httpx.Response] | None:
        urls = list(self.clients)
        random.shuffle(urls)
        for u in urls:
            try:
                r = self.clients[u].post(f"/{verb}", content=orjson.dumps(body))
            except httpx.TransportError:
                continue
            if r.status_code == 503:
                continue
            return u, r
        return None

    def schedule(self, name: str) -> None:
        nodes = [f"n{i}" for i in range(NODES)]
        while not self.give_up.is_set():
            obj = self.kube.server.get("pods", name, "default")
            assert obj is not None
            pod = {"kind": "Pod", "apiVersion": "v1", **obj}
            reason = self._attempt(name, pod, nodes)
            if reason is None:
                return
            with self.lock:
                self.pending[name] = reason
            self.give_up.wait(0.05 + random.random() * 0.1)

    def _attempt(self, name: str, pod: dict, nodes: list[str]) -> str | None:
        got = self._post("filter", extender_args(pod, nodes))
        if got is None:
            return "no extender replica answered filter"
        body = got[1].json()
        feasible = body["NodeNames"] or []
        if not feasible:
            return f"unschedulable: {body.get('FailedNodes') or body.get('Error')}"
        best = feasible[0]
        if len(feasible) > 1:
            got = self._post("prioritize", extender_args(pod, feasible))
            if got is None:
                return "no extender replica answered prioritize"
            scores = got[1].json()
            best = max(scores, key=lambda s: (s["Score"], -feasible.index(s["Host"])))["Host"]
        got = self._post("bind", binding_args(pod, best))
        if got is None:
            return "no extender replica answered bind"
        url, r = got
        err = r.json()["Error"]
        if err:
            with self.lock:
                self.refusals.append(err)
            return f"bind failed: {err}"
        with self.lock:
            self.bound[name] = (url, time.monotonic())
            self.pending.pop(name, None)
        return None

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


@pytest.mark.parametrize("mode", ["crash", "graceful", "partition"])
def test_failover_during_a_bind_storm(fake_kube, replicas, mode: str) -> None:
    """crash: renewals stop, the HTTP server goes; graceful: the Lease is released too;
    partition: renewals stop but the old leader keeps answering HTTP (it must turn itself into
    a standby at its renew deadline, and refuse binds from then on)."""
    crash = mode != "graceful"
    s = fake_kube.server
    old = eventually(lambda: _leaders(replicas), what="a leader")[0]
    for i in range(PODS):
        s.add_pod(copack_pod(f"p{i:03d}", demand=f"sm=0.1,bw=0.1,mem={POD_MEM}Gi"))
    eventually(lambda: all(len(x.state.pods) == PODS for x in replicas), what="pods seen")
    sched = Scheduler(fake_kube, [x.url for x in replicas])
    threads = [threading.Thread(target=sched.schedule, args=(f"p{i:03d}",), daemon=True)
               for i in range(PODS)]
    for t in threads:
        t.start()
    try:
        eventually(lambda: len(sched.bound) >= 40, what="40 pods bound before the kill")
        t_kill = time.monotonic()
        # in a thread: the HTTP server's graceful shutdown lets in-flight verbs finish
        assert old.elector is not None
        killer = (threading.Thread(target=old.elector.stop, kwargs={"release": False})
                  if mode == "partition" else
                  threading.Thread(target=old.stop, kwargs={"release_lease": not crash}))
        killer.start()
        rest = [x for x in replicas if x is not old]
        new = eventually(lambda: _leaders(rest), timeout=LEASE_S + 10, what="a new leader")
        assert len(new) == 1
        t_leader = time.monotonic()

        def first_new_bind() -> float | None:
            with sched.lock:
                ts = [t for u, t in sched.bound.values() if u == new[0].url and t > t_kill]
            return min(ts) if ts else None

        t_first = eventually(first_new_bind, timeout=10, what="a bind by the new leader")
        # quiesce: every unbound pod has been refused by the new leader's full view
        def settled() -> bool:
            with sched.lock:
                last = max(t for _, t in sched.bound.values())
                return time.monotonic() - last > 1.5
        eventually(settled, timeout=30, what="the storm to settle")
        killer.join(15)
    finally:
        sched.give_up.set()
        for t in threads:
            t.join(10)
        sched.close()
    failover = t_first - t_kill
    kinds = Counter(re.sub(r"[\w-]+/p\d+|\bn\d+\b", "X", e)[:70] for e in sched.refusals)
    print("\nbind errors by kind:", dict(kinds.most_common(4)))
    # nothing bound by the old leader after its renew deadline
    late = [n for n, (u, t) in sched.bound.items()
            if u == old.url and t > t_kill + RENEW_S + 0.1]
    assert late == [], late
    if mode == "partition":  # still serving, as a standby now
        assert not old.is_leader()
        with httpx.Client(base_url=old.url, timeout=5) as c:
            r = c.get("/readyz")
        ident = new[0].config.leader_election.identity
        # it cannot read the Lease (partitioned): it does not claim to know the leader
        assert r.status_code == 200
        assert r.text in (f"ok; standby; leader is {ident}", "ok; standby; no leader known")
    print(f"\n[{mode}] leader {new[0].config.leader_election.identity}"
          f" after {t_leader - t_kill:.2f}s; first successful bind after the kill "
          f"{failover:.2f}s (lease {LEASE_S}s, retry {RETRY_S}s); bound {len(sched.bound)}, "
          f"pending {PODS - len(sched.bound)}, bind errors answered {len(sched.refusals)}")
    # crash: the Lease must expire first (observed on the rival's clock, polled every retry
    # period); graceful: it is released, so a retry period or so
    took = t_leader - t_kill
    limit = LEASE_S + 2 * RETRY_S + 0.5 if crash else 2 * RETRY_S + 0.5
    assert took <= limit, f"the new leader took {took:.2f}s (limit {limit}s)"
    # then: relist, and the scheduler's next try (its backoff, 200 pods in flight)
    assert failover <= limit + 2.0, f"first bind {failover:.2f}s after the kill"

    # bound exactly once (the API server refuses a second binding with 409), or Pending
    created = Counter(r.name for r in s.requests_matching(verb="create", subresource="binding")
                      if r.status == 201)
    assert all(n == 1 for n in created.values()), created
    pods = {p["metadata"]["name"]: p for p in s.list("pods", "default")}
    per_unit: dict[str, list[str]] = {}
    for name, p in pods.items():
        node = p["spec"].get("nodeName")
        ann = p["metadata"].get("annotations") or {}
        if node:
            assert created[name] == 1 and name in sched.bound, name
            per_unit.setdefault(ann["copack.io/unit"], []).append(name)
        else:
            assert created[name] == 0 and "copack.io/unit" not in ann
            assert sched.pending.get(name), f"{name} pending without a reason"
    for unit, names in per_unit.items():
        assert len(names) <= SLOTS, (unit, names)
        assert len(names) * POD_MEM * GI <= H100_MEMORY, (unit, names)
    # all the capacity was used and nothing more: 40 units x 4
    assert len(per_unit) == NODES * GPUS and sum(map(len, per_unit.values())) == 160
    assert all("unschedulable" in sched.pending[n] for n in pods if n not in sched.bound)
    # the new leader's view agrees with the API server's
    leader = new[0]
    eventually(lambda: sum(1 for i in leader.state.pods.values() if i.unit) == 160,
               what="the new leader's view")
