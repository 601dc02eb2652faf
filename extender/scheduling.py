"""The three extender verbs on top of the cluster state and the decision core.

filter      decide() over the candidate nodes; unknown nodes and nodes that can never host a
            copack pod are reported with a reason, infeasible ones with the core's reason.
prioritize  the scores of filter's decision for the same pod (reused while younger than a
            second: telemetry moves the view version thousands of times a second, and bind
            re-decides anyway), else a fresh decide().
bind        under the node's lock: re-choose the unit (the state may have moved since
            prioritize), assume it in the state at once, create the binding carrying the unit
            annotations, and undo the assumption if that fails. A retry of a bind that already
            happened answers success without a second binding.

Pods that do not ask for `copack.io/gpu` pass through untouched (all nodes, score 0)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

import numpy as np
import orjson

from extender.binder import AlreadyBound, Binder, BindError, BindUncertain
from extender.name_lists import NameListCache
from extender.protocol import (
    MAX_EXTENDER_PRIORITY,
    BindingArgs,
    ExtenderArgs,
    binding_result,
    filter_result,
    priority_result,
)
from extender.state import ClusterState, rfc3339
from policies.annotations import AnnotationError, pod_request_from_k8s, requests_gpu
from policies.decision import Decision, Rejection, choose_unit, decide
from policies.inventory import ASSIGNED_AT_ANNOTATION, SM_SHARE_ANNOTATION, UNIT_ANNOTATION
from policies.model import PodRequest

log = logging.getLogger("copack.extender")

DECISION_REUSE_S = 1.0
UNKNOWN_NODE = "unknown node: not in the extender's cluster view"
STALE_NOTE = "; telemetry stale, judged on declared demand"
_SCORE_TAILS = tuple(b"%d}" % s for s in range(MAX_EXTENDER_PRIORITY + 1))
DECISIONS_KEPT = 16  # full Decision objects hold per-unit arrays: keep only the latest few


@dataclass(slots=True)
class _Recent:
    uid: str
    rv: str
    decision: Decision
    at: float  # monotonic


class Scheduler:
    """See the module docstring. Thread-safe; filter/prioritize never block on I/O."""

    def __init__(self, state: ClusterState, binder: Binder | None) -> None:
        self.state = state
        self.binder = binder
        self._recent: OrderedDict[str, _Recent] = OrderedDict()
        self._entries: dict[str, tuple[bytes, ...]] = {}
        self._rows_table: tuple[int, np.ndarray] | None = None
        self.names = NameListCache()  # NodeNames arrays by their bytes (filter's answers too)

    # -- helpers -------------------------------------------------------------------------------

    def _request(self, args: ExtenderArgs) -> PodRequest:
        meta = args.pod.get("metadata") or {}
        rv = str(meta.get("resourceVersion") or "")
        cache = self.state.requests
        if args.uid:
            hit = cache.get(args.uid, rv)
            if hit is not None:
                return hit
        req = pod_request_from_k8s(args.pod)
        if args.uid:
            with self.state.lock:
                cache.put(args.uid, rv, req)
        return req

    def _remember(self, key: str, uid: str, rv: str, d: Decision) -> None:
        self._recent[key] = _Recent(uid, rv, d, time.monotonic())
        self._recent.move_to_end(key)
        while len(self._recent) > DECISIONS_KEPT:
            self._recent.popitem(last=False)

    def _explain_filter(self, verb: str, req: PodRequest, d: Decision, extra: dict) -> None:
        summary = {
            "pod": req.key,
            "uid": req.uid,
            "verb": verb,
            "at": rfc3339(self.state.now()),
            "role": req.role,
            "role_source": req.role_source,
            **extra,
        }
        self.state.record_explanation(req.key, summary)

    def _split_failures(
        self, failed: dict[str, str], all_in_view: bool = False
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Resolvable failures (load: preemption may help) vs nodes that can never host a copack
        pod (no or broken inventory). Unknown nodes stay resolvable: they may appear. Up to
        three dict/set lookups per failed node: this runs for up to 5,000 nodes per filter.
        `all_in_view`: every failed node has a row in the view, so the state knows it (the
        view's nodes are the state's nodes with units) and the first check is moot."""
        s = self.state
        nodes, problems = s.nodes, s.problem_nodes
        stale = s.stale_nodes()
        names = failed.keys()
        if (
            (all_in_view or names <= nodes.keys())
            and (not problems or names.isdisjoint(problems))
            and names.isdisjoint(stale)
        ):
            return failed, {}  # the common case, decided with C-level set operations
        out: dict[str, str] = {}
        never: dict[str, str] = {}
        for name, reason in failed.items():
            if name not in nodes:
                out[name] = UNKNOWN_NODE
            elif name in problems:
                never[name] = problems[name]
            elif name in stale:
                out[name] = reason + STALE_NOTE
            else:
                out[name] = reason
        return out, never

    # -- verbs -----------------------------------------------------------------------------------

    def filter(self, args: ExtenderArgs) -> tuple[bytes, str]:
        """-> (ExtenderFilterResult JSON, outcome label)."""
        if not requests_gpu(args.pod):
            return filter_result(args, list(args.node_names), {}), "passthrough"
        key = f"{args.namespace}/{args.name}"
        try:
            req = self._request(args)
        except AnnotationError as e:
            reason = f"pod {key}: {e}"
            self.state.record_explanation(
                key, {"pod": key, "uid": args.uid, "verb": "filter", "refused": reason,
                      "at": rfc3339(self.state.now())}
            )
            return (
                filter_result(args, [], {}, dict.fromkeys(args.node_names, reason)),
                "invalid_pod",
            )
        s = self.state
        with s.lock:
            if args.nodes is not None:
                # nodeCacheCapable=false: the scheduler's own Node objects are authoritative;
                # take any our watch has not delivered yet instead of calling them unknown
                for node in args.nodes:
                    if node["metadata"]["name"] not in s.nodes:
                        s.upsert_node(node)
            now = s.now()
            d = decide(s.view, req, args.node_names, now, s.policy, s.demand_model)
            feasible = d.feasible_nodes
            failed, never = self._split_failures(d.failed_nodes, d.failed_all_in_view)
            rv = str((args.pod.get("metadata") or {}).get("resourceVersion") or "")
            self._remember(key, args.uid, rv, d)
            chosen = d.chosen
            self._explain_filter(
                "filter", req, d,
                {"candidates": len(args.node_names), "feasible": len(feasible),
                 "chosen": list(chosen) if chosen else None,
                 "failed_sample": dict(islice(chain(never.items(), failed.items()), 20))},
            )
        names_json = None
        if args.nodes is None and len(feasible) > 1:
            # prioritize will send these names back: know them by their bytes
            names_json = orjson.dumps(feasible)
            self.names.put(names_json, feasible)
        return filter_result(args, feasible, failed, never, names_json=names_json), (
            "feasible" if feasible else "unschedulable"
        )

    def prioritize(self, args: ExtenderArgs) -> tuple[bytes, str]:
        names = args.node_names
        if not requests_gpu(args.pod):
            return priority_result([(n, 0) for n in names]), "passthrough"
        key = f"{args.namespace}/{args.name}"
        try:
            req = self._request(args)
        except AnnotationError:
            return priority_result([(n, 0) for n in names]), "invalid_pod"
        s = self.state
        rv = str((args.pod.get("metadata") or {}).get("resourceVersion") or "")
        with s.lock:
            recent = self._recent.get(key)
            if (
                recent is not None
                and recent.uid == args.uid
                and recent.rv == rv
                and time.monotonic() - recent.at <= DECISION_REUSE_S
            ):
                d = recent.decision
                outcome = "reused"
            else:
                d = decide(s.view, req, names, s.now(), s.policy, s.demand_model)
                self._remember(key, args.uid, rv, d)
                outcome = "decided"
            rows = vals = table = None
            if names == d.feasible_nodes and d.layout_version == s.view.layout_version:
                # names are the decision's feasible nodes, in its order, on today's rows
                rows, vals = d.feasible_rows, d.node_score
                table = self._row_entries()
            scores = d.scores if table is None else {}
        if table is not None:
            # one fancy index picks every `{"Host":..,"Score":..}` at C speed
            parts = table[rows, vals[rows]].tolist()
        else:
            entry = self._priority_entries
            get = scores.get
            parts = [entry(n)[get(n, 0)] for n in names]
        return b"[" + b",".join(parts) + b"]", outcome

    def _row_entries(self) -> np.ndarray:
        """(rows, 11) object array: a node's first row -> its pre-encoded entries, rebuilt
        when the view's layout changes (state lock held). Indexing it by the decision's
        feasible rows and scores replaces a Python call per name (1 ms at 3,333 names)."""
        view = self.state.view
        cached = self._rows_table
        if cached is not None and cached[0] == view.layout_version:
            return cached[1]
        table = np.empty((view.n_rows, MAX_EXTENDER_PRIORITY + 1), dtype=object)
        entry = self._priority_entries
        for name, row in view.primary_rows().items():
            table[row] = entry(name)
        self._rows_table = (view.layout_version, table)
        return table

    def _priority_entries(self, name: str) -> tuple[bytes, ...]:
        """`{"Host":name,"Score":s}` pre-encoded for s = 0..10: the answer to a 5,000-name
        prioritize is joined from these instead of building and encoding 5,000 dicts."""
        hit = self._entries.get(name)
        if hit is None:
            if len(self._entries) > 2 * len(self.state.nodes) + 1024:
                self._entries.clear()  # nodes come and go: never hold more than twice the cluster
            head = b'{"Host":' + orjson.dumps(name) + b',"Score":'
            hit = self._entries[name] = tuple(head + s for s in _SCORE_TAILS)
        return hit

    def bind(self, args: BindingArgs) -> tuple[bytes, str]:
        """Blocking (creates the binding): call from a worker thread."""
        s = self.state
        key = f"{args.pod_namespace}/{args.pod_name}"
        node = args.node
        with s.node_lock(node):
            with s.lock:
                info = s.pods.get(key)
                uid = args.pod_uid or (info.uid if info else "")
                now = s.now()
                if info is not None and info.uid == uid and info.unit and info.node:
                    if info.node != node:
                        msg = f"{key} is already bound to {info.node} (unit {info.unit})"
                        return binding_result(msg), "conflict"
                    if not info.uncertain:
                        return binding_result(), "already_bound"  # a retry of a bind that worked
                    # the last attempt may not have reached the API: bind again, same unit
                    req = s.request_of(info)
                    unit, share = info.unit, info.sm_share or 100
                    at = info.assigned_at if info.assigned_at is not None else now
                    detail: dict[str, Any] = {"retried": True}
                else:
                    req = self._bind_request(key, uid, info)
                    if isinstance(req, tuple):
                        return req
                    choice = choose_unit(s.view, req, node, now, s.policy, s.demand_model)
                    if isinstance(choice, Rejection):
                        self._explain_bind(key, uid, node, None, choice.reason)
                        return binding_result(
                            f"no unit on {node} can take {key} any more: {choice.reason}"
                        ), "no_fit"
                    unit, share, at = choice.unit, choice.sm_share, now
                    detail = {"demand": choice.demand.as_dict(), "score": choice.score}
                    s.assume(req, node, unit, share, at)
                annotations = {
                    UNIT_ANNOTATION: unit,
                    SM_SHARE_ANNOTATION: str(share),
                    ASSIGNED_AT_ANNOTATION: rfc3339(at),
                }
            return self._create_binding(args, key, uid, req, annotations, share, at, detail)

    def _bind_request(
        self, key: str, uid: str, info: Any
    ) -> PodRequest | tuple[bytes, str]:
        """The parsed request for a pod about to be bound (filter's, else the watch's)."""
        s = self.state
        req = None
        if uid:
            hit = s.requests.entries.get(uid)
            req = hit[1] if hit else None
        if req is None and info is not None and info.uid == uid:
            req = info.request
            if req is None and info.request_error:
                return binding_result(f"pod {key}: {info.request_error}"), "invalid_pod"
        if req is None:
            return binding_result(
                f"pod {key} (uid {uid or '?'}) is unknown to the extender: it was not "
                "filtered by it and is not in its cluster view"
            ), "unknown_pod"
        return req if req.uid == uid else _with_uid(req, uid)

    def _create_binding(
        self,
        args: BindingArgs,
        key: str,
        uid: str,
        req: PodRequest,
        annotations: dict[str, str],
        share: int,
        at: float,
        detail: dict[str, Any],
    ) -> tuple[bytes, str]:
        """Call the binder (node lock held, state lock not) and settle the assumption."""
        s = self.state
        node, unit = args.node, annotations[UNIT_ANNOTATION]
        if self.binder is None:
            s.unassume(key, uid)
            return binding_result("the extender has no binder configured"), "failed"
        try:
            self.binder.bind(args.pod_namespace, args.pod_name, uid, node, annotations)
        except AlreadyBound as e:
            theirs = e.annotations.get(UNIT_ANNOTATION)
            if e.node == node and theirs:
                # our own earlier bind whose answer was lost: adopt what the pod carries
                s.assume(req, node, theirs, _share(e.annotations.get(SM_SHARE_ANNOTATION)), at)
                self._explain_bind(key, uid, node, theirs, None, adopted=True)
                return binding_result(), "already_bound"
            s.unassume(key, uid)
            self._explain_bind(key, uid, node, None, str(e))
            return binding_result(str(e)), "conflict"
        except BindUncertain as e:
            # keep the assumption: the capacity stays reserved until the watch shows the pod
            # bound (confirmed), a retried bind settles it, or the confirmation timeout ends it
            s.mark_uncertain(key, uid, True)
            self._explain_bind(key, uid, node, unit, str(e), uncertain=True)
            return binding_result(str(e)), "uncertain"
        except BindError as e:
            s.unassume(key, uid)
            self._explain_bind(key, uid, node, None, str(e))
            return binding_result(str(e)), "failed"
        except Exception as e:  # a binder bug must still leave nothing assumed
            s.unassume(key, uid)
            log.exception("binder failed for %s", key)
            return binding_result(f"binding {key} failed: {type(e).__name__}: {e}"), "failed"
        s.mark_uncertain(key, uid, False)
        self._explain_bind(key, uid, node, unit, None, sm_share=share, **detail)
        return binding_result(), "bound"

    def _explain_bind(
        self, key: str, uid: str, node: str, unit: str | None, error: str | None, **extra: Any
    ) -> None:
        prev = self.state.explanation(key) or {"pod": key}
        entry = dict(prev)
        entry["bind"] = {
            "node": node,
            "unit": unit,
            "error": error,
            "at": rfc3339(self.state.now()),
            "uid": uid,
            **extra,
        }
        self.state.record_explanation(key, entry)

    def explain(self, namespace: str, name: str) -> dict[str, Any] | None:
        key = f"{namespace}/{name}"
        s = self.state
        with s.lock:
            base = s.explanation(key)
            recent = self._recent.get(key)
            info = s.pods.get(key)
            if base is None and recent is None and info is None:
                return None
            out: dict[str, Any] = dict(base or {"pod": key})
            if recent is not None:
                out["decision"] = recent.decision.explain()
            if info is not None:
                out["state"] = info.to_dict()
                if info.unit and s.view.unit_type(info.unit) is not None:
                    out["state"]["unit_load"] = s.view.unit_load(
                        info.unit, s.now(), s.policy.stale_after_s
                    )
            return out


def _with_uid(req: PodRequest, uid: str) -> PodRequest:
    from dataclasses import replace

    return replace(req, uid=uid)


def _share(text: str | None) -> int:
    try:
        return max(1, min(100, int(str(text))))
    except (TypeError, ValueError):
        return 100
