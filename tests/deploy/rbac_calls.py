"""Which Kubernetes API calls a component's code makes, as RBAC (apiGroup, resource, verb).

Found statically, over every code path rather than the ones tests happen to run, in the
component's files and the repository modules they import: each
reference to a method of the official client's API classes (`core.list_node`, also when it is
only stored in a variable or handed to `watch.Watch().stream`) is translated into its HTTP
method and path by reading the client's own request builder (`_<method>_serialize`), then into
the RBAC verb kube-apiserver checks. A list method counts as `watch` too when its module
watches: it passes the method to `.stream(...)`, calls something with `watch=True`, or imports
`kubernetes.watch`. Hand-built requests (`call_api`, `param_serialize`, `request`) cannot be
read this way and are reported, so a reviewer has to add them here."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, order=True)
class Permission:
    group: str  # "" for the core group
    resource: str  # "pods", "pods/binding"
    verb: str

    def __str__(self) -> str:
        return f"{self.verb} {self.group + '/' if self.group else ''}{self.resource}"


@dataclass(frozen=True, order=True)
class ApiCall:
    method: str  # client method name, e.g. list_pod_for_all_namespaces
    where: str  # path:line of the first reference
    permissions: tuple[Permission, ...]


class UnreadableRequest(ValueError):
    """Code that builds API requests by hand, which this scan cannot translate."""


_BUILDER = re.compile(
    r"def _(\w+)_serialize\(.*?method='(\w+)',\s*resource_path='([^']+)'", re.S
)


@functools.cache
def client_methods() -> dict[str, frozenset[tuple[str, str]]]:
    """Client method name -> its (HTTP method, path template)s over every API class (the same
    name exists in several versions of a group, e.g. v1 and v1beta1). Read from the source of
    each method's request builder, `_<name>_serialize`."""
    out: dict[str, set[tuple[str, str]]] = {}
    for source in {id(t): t for t in _api_sources().values()}.values():
        # One builder per chunk, so a match cannot run on into the next method.
        for chunk in source.split("\n    def ")[1:]:
            m = _BUILDER.match("def " + chunk)
            if m is None:
                continue
            name, http_method, path = m.groups()
            for alias in (name, f"{name}_with_http_info"):
                out.setdefault(alias, set()).add((http_method, path))
    if "create_namespaced_pod_binding" not in out:
        raise AssertionError("could not read the kubernetes client's request builders")
    return {k: frozenset(v) for k, v in out.items()}


def permission_for(http_method: str, path: str, watch: bool = False) -> list[Permission]:
    m = re.fullmatch(r"/api/v1(/.*)|/apis/([^/]+)/[^/]+(/.*)", path)
    if m is None:
        raise ValueError(f"not a resource path: {path}")
    group, rest = ("", m[1]) if m[1] is not None else (m[2], m[3])
    segs = rest.strip("/").split("/")
    if segs[0] == "namespaces" and len(segs) > 2:
        segs = segs[2:]
    resource = segs[0]
    named = len(segs) > 1 and segs[1] == "{name}"
    if len(segs) > 2:
        resource = f"{resource}/{segs[2]}"
    verb = {
        "GET": "get" if named else "list",
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }[http_method]
    perms = [Permission(group, resource, verb)]
    if watch and verb == "list":
        perms.append(Permission(group, resource, "watch"))
    return perms


HAND_BUILT = {"call_api", "param_serialize"}


def _module_watches(tree: ast.AST, methods: dict[str, frozenset]) -> set[str] | bool:
    """True when the whole module watches; else the list methods passed to `.stream(...)`."""
    streamed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.module == "kubernetes.watch"
            or (node.module == "kubernetes" and any(a.name == "watch" for a in node.names))
        ):
            return True
        if isinstance(node, ast.Import) and any(a.name == "kubernetes.watch" for a in node.names):
            return True
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "watch" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    return True
            if isinstance(node.func, ast.Attribute) and node.func.attr == "stream" and node.args:
                first = node.args[0]
                if isinstance(first, ast.Attribute) and first.attr in methods:
                    streamed.add(first.attr)
    return streamed


@functools.cache
def _api_sources() -> dict[str, str]:
    """Class name -> source of each API module of the installed client (read, not imported:
    importing them all takes seconds)."""
    spec = importlib.util.find_spec("kubernetes")
    if spec is None or spec.origin is None:
        raise AssertionError("the kubernetes client is not installed")
    out = {}
    for path in sorted((Path(spec.origin).parent / "client" / "api").glob("*_api.py")):
        text = path.read_text()
        for cls in re.findall(r"^class (\w+Api)\b", text, re.M):
            out[cls] = text
    return out


@functools.cache
def api_classes() -> frozenset[str]:
    return frozenset(_api_sources())


def _names_api_class(node: ast.AST | None) -> bool:
    """`CoreV1Api`, `client.CoreV1Api`, `k8s.CoreV1Api`, or a string annotation of one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            return _names_api_class(ast.parse(node.value, mode="eval").body)
        except SyntaxError:
            return False
    if isinstance(node, ast.Name):
        return node.id in api_classes()
    if isinstance(node, ast.Attribute):
        return node.attr in api_classes()
    if isinstance(node, ast.BinOp):  # `CoreV1Api | None`
        return _names_api_class(node.left) or _names_api_class(node.right)
    if isinstance(node, ast.Subscript):  # Optional[CoreV1Api]
        return _names_api_class(node.slice)
    return False


def _api_holders(tree: ast.AST) -> set[str]:
    """Expressions (as source) that hold a client API object: `self._core`, `core`, `api`."""
    holders: set[str] = set()
    # Functions annotated to return a client API object: `def core() -> client.CoreV1Api`.
    factories = {n.name for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                 and _names_api_class(n.returns)}

    def produces(v: ast.AST | None) -> bool:
        if isinstance(v, ast.Call):
            f = v.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(
                f, ast.Attribute) else None
            return _names_api_class(f) or called in factories
        if isinstance(v, ast.Name | ast.Attribute):
            return ast.unparse(v) in holders
        if isinstance(v, ast.IfExp):
            return produces(v.body) or produces(v.orelse)
        if isinstance(v, ast.BoolOp):
            return any(produces(x) for x in v.values)
        return False

    for _ in range(3):  # assignments can chain: api -> self._api
        for node in ast.walk(tree):
            if isinstance(node, ast.arg) and _names_api_class(node.annotation):
                holders.add(node.arg)
            elif isinstance(node, ast.Assign) and produces(node.value):
                holders.update(ast.unparse(t) for t in node.targets)
            elif isinstance(node, ast.AnnAssign) and (
                _names_api_class(node.annotation) or produces(node.value)
            ):
                holders.add(ast.unparse(node.target))
    return holders


@dataclass(frozen=True, order=True)
class UnresolvedReference:
    """`x.<client method name>` where x is not known to be a client API object."""

    method: str
    where: str
    receiver: str


def scan_source(source: str, filename: str) -> tuple[list[ApiCall], list[UnresolvedReference]]:
    methods = client_methods()
    tree = ast.parse(source, filename)
    watched = _module_watches(tree, methods)
    holders = _api_holders(tree)
    first_ref: dict[str, int] = {}
    unresolved = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr in HAND_BUILT:
            raise UnreadableRequest(f"{filename}:{node.lineno}: hand-built request "
                                    f"({node.attr}); add its permission by hand")
        if node.attr not in methods or node.attr.startswith("get_api_"):
            continue
        receiver = ast.unparse(node.value)
        direct = isinstance(node.value, ast.Call) and _names_api_class(node.value.func)
        if receiver in holders or direct:  # `core.list_node`, `CoreV1Api(api).list_node`
            first_ref.setdefault(node.attr, node.lineno)
        else:
            unresolved.append(UnresolvedReference(node.attr, f"{filename}:{node.lineno}",
                                                  receiver))
    calls = []
    for name, line in first_ref.items():
        watch = watched is True or (isinstance(watched, set) and name in watched)
        options = {tuple(permission_for(m, p, watch)) for m, p in methods[name]}
        if len(options) != 1:
            raise UnreadableRequest(f"{filename}:{line}: {name} means different permissions in "
                                    f"different API classes: {sorted(options)}")
        calls.append(ApiCall(name.removesuffix("_with_http_info"), f"{filename}:{line}",
                             options.pop()))
    return sorted(calls), sorted(unresolved)


def _module_file(repo: Path, dotted: str) -> list[Path]:
    """The files importing `dotted` executes: each package's __init__ and the module."""
    parts = dotted.split(".")
    files = []
    for i in range(1, len(parts) + 1):
        base = repo.joinpath(*parts[:i])
        if (base / "__init__.py").is_file():
            files.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            files.append(base.with_suffix(".py"))
            break
        else:
            break
    return files


def import_closure(repo: Path, component: str) -> list[Path]:
    """Every file of the repository a component's code can run: its own files and, transitively,
    the repository modules they import (lazily inside functions too), e.g. `policies`, `workloads`.
    Third-party packages are outside the repository and not followed."""
    todo = [p for p in (repo / component).rglob("*.py")]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(), str(path))
        package = path.relative_to(repo).parent.parts
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1])
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for name in names:
                todo += _module_file(repo, name)
    return sorted(seen)


def scan_component(repo: Path, component: str) -> tuple[list[ApiCall], list[UnresolvedReference]]:
    """All API calls a component's code can make (its import closure within the repository),
    and the references that stay unresolved: a client method name on a receiver not known to
    be a client API object, unless the code defines a function of that name itself (then it
    is taken as calling its own, e.g. ClusterState.delete_node)."""
    calls: list[ApiCall] = []
    unresolved: list[UnresolvedReference] = []
    own: set[str] = set()
    for path in import_closure(repo, component):
        c, u = scan_source(path.read_text(), path.relative_to(repo).as_posix())
        calls += c
        unresolved += u
        own |= {n.name for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    return calls, [u for u in unresolved if u.method not in own]


def required(calls: list[ApiCall]) -> set[Permission]:
    return {p for c in calls for p in c.permissions}
