"""RBAC grants exactly the API calls the code makes: the extender's, the agent's and the
rebalancer's ServiceAccounts are checked against the calls found in extender/, node_agent/ and
rebalancer/ and the repository modules they import (see rbac_calls.py for how), in both
directions. The scheduler's RBAC is upstream kube-scheduler's own (bootstrap ClusterRoles) plus
its lease, checked for shape."""

from __future__ import annotations

import textwrap

import pytest

from tests.deploy.manifests import NAMESPACE, OVERLAYS, REPO, find, one, render
from tests.deploy.rbac_calls import (
    Permission,
    UnreadableRequest,
    required,
    scan_component,
    scan_source,
)

COMPONENTS = {"copack-extender": "extender", "copack-agent": "node_agent",
              "copack-rebalancer": "rebalancer"}


def granted(objs: list[dict], service_account: str) -> set[Permission]:
    """Everything the bindings in `objs` grant the ServiceAccount, one permission per verb."""
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]): r
             for r in find(objs, "Role") + find(objs, "ClusterRole")}
    out: set[Permission] = set()
    for b in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding"):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == service_account
                   and s["namespace"] == NAMESPACE for s in b["subjects"]):
            continue
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace") if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], ns, ref["name"])]
        for rule in role["rules"]:
            # Wildcards and name-limited rules cannot be matched against code that names
            # whatever object it works on; neither is used for these two accounts.
            assert "resourceNames" not in rule, (service_account, rule)
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (service_account, rule)
            for g in rule["apiGroups"]:
                for r in rule["resources"]:
                    for v in rule["verbs"]:
                        out.add(Permission(g, r, v))
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("account", sorted(COMPONENTS))
def test_role_grants_exactly_what_the_code_calls(overlay: str, account: str) -> None:
    calls, unresolved = scan_component(REPO, COMPONENTS[account])
    assert not unresolved, f"cannot tell whether these call the API: {unresolved}"
    need = required(calls)
    have = granted(render(overlay), account)
    listing = "\n".join(f"  {c.where}: {c.method} -> {', '.join(map(str, c.permissions))}"
                        for c in calls)
    assert have >= need, f"missing {sorted(map(str, need - have))}; calls:\n{listing}"
    assert have <= need, f"granted but unused {sorted(map(str, have - need))}; calls:\n{listing}"


def test_the_calls_found_include_the_ones_copack_is_built_on() -> None:
    """Guards the scan itself: an empty or partial scan would make the test above vacuous."""
    ext = required(scan_component(REPO, "extender")[0])
    assert Permission("", "pods/binding", "create") in ext  # the extender binds
    assert {Permission("", "nodes", "watch"), Permission("", "pods", "watch")} <= ext
    agent = required(scan_component(REPO, "node_agent")[0])
    assert Permission("", "nodes", "patch") in agent  # the inventory annotations
    reb = required(scan_component(REPO, "rebalancer")[0])
    assert {Permission("", "pods/eviction", "create"),  # moves only by the Eviction API
            Permission("", "nodes", "patch"),  # copack.io/draining
            Permission("policy", "poddisruptionbudgets", "list"),
            Permission("", "pods", "watch")} <= reb
    assert Permission("", "pods", "delete") not in reb  # never deletes pods around the PDBs


def _scan(code: str) -> tuple[list[str], list[str]]:
    calls, unresolved = scan_source(textwrap.dedent(code), "example.py")
    return (sorted(str(p) for c in calls for p in c.permissions),
            [f"{u.receiver}.{u.method}" for u in unresolved])


def test_scan_follows_api_objects_through_variables_and_annotations() -> None:
    perms, unresolved = _scan("""
        from kubernetes import client as k8s
        class Watcher:
            def __init__(self, api_client, resource):
                core = k8s.CoreV1Api(api_client)
                self._list = core.list_node if resource == "nodes" else core.list_namespaced_pod
            def run(self):
                return self._list(watch=True)
        class Patcher:
            def __init__(self, api: "k8s.CoreV1Api | None" = None):
                self._api = api
            def go(self):
                self._api.patch_namespaced_pod("p", "ns", {})
                self._api.create_namespaced_pod_binding_with_http_info("p", "ns", {})
        leases = k8s.CoordinationV1Api()
        leases.replace_namespaced_lease("l", "ns", {})
    """)
    assert perms == ["create pods/binding", "list nodes", "list pods", "patch pods",
                     "update coordination.k8s.io/leases", "watch nodes", "watch pods"]
    assert unresolved == []


def test_scan_counts_watch_only_where_the_module_watches() -> None:
    perms, _ = _scan("""
        from kubernetes import client
        api = client.CoreV1Api()
        api.list_node()
    """)
    assert perms == ["list nodes"]
    perms, _ = _scan("""
        import kubernetes.client
        api = kubernetes.client.CoreV1Api()
        def follow(w):
            for event in w.stream(api.list_pod_for_all_namespaces):
                pass
        api.list_node()
    """)
    assert perms == ["list nodes", "list pods", "watch pods"]


def test_scan_reports_what_it_cannot_resolve() -> None:
    _, unresolved = _scan("""
        def f(api):
            api.delete_namespaced_pod("p", "ns")
    """)
    assert unresolved == ["api.delete_namespaced_pod"]
    with pytest.raises(UnreadableRequest, match="hand-built"):
        _scan("""
            def f(api_client):
                api_client.call_api("/api/v1/secrets", "GET")
        """)


def test_scheduler_gets_upstream_roles_and_only_its_own_lease() -> None:
    objs = render("base")
    refs = sorted((b["kind"], b["roleRef"]["name"]) for b in
                  find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding")
                  if any(s["name"] == "copack-scheduler" for s in b["subjects"]))
    assert refs == [
        ("ClusterRoleBinding", "system:kube-scheduler"),
        ("ClusterRoleBinding", "system:volume-scheduler"),
        ("RoleBinding", "copack-scheduler-leader-election"),
        ("RoleBinding", "extension-apiserver-authentication-reader"),
    ]
    reader = one(objs, "RoleBinding", "copack-scheduler-extension-apiserver-authentication-reader")
    assert reader["metadata"]["namespace"] == "kube-system"


def test_no_account_may_read_secrets_except_the_dev_tls_job() -> None:
    for overlay in OVERLAYS:
        for role in find(render(overlay), "Role") + find(render(overlay), "ClusterRole"):
            for rule in role["rules"]:
                if "secrets" in rule["resources"]:
                    assert role["metadata"]["name"] == "copack-tls-bootstrap", role
                    assert overlay == "overlays/dev"



def test_scan_follows_the_components_imports_into_the_repository(tmp_path) -> None:
    (tmp_path / "comp").mkdir()
    (tmp_path / "comp" / "__init__.py").write_text("")
    (tmp_path / "comp" / "main.py").write_text(
        "def run():\n    from shared.kube import evict\n    evict()\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "__init__.py").write_text("")
    (tmp_path / "shared" / "kube.py").write_text(
        "from kubernetes import client\n"
        "def evict():\n    client.CoreV1Api().delete_namespaced_pod('p', 'ns')\n")
    (tmp_path / "shared" / "unused.py").write_text(
        "from kubernetes import client\nclient.CoreV1Api().delete_node('n')\n")
    calls, unresolved = scan_component(tmp_path, "comp")
    assert [(c.method, c.where) for c in calls] == [
        ("delete_namespaced_pod", "shared/kube.py:3")]
    assert unresolved == []
