"""Every rendered object validates with kubernetes-validate in strict mode (unknown fields are
errors) against current Kubernetes releases; the two Prometheus Operator custom resources,
which it has no schema for, against the CRD schemas in crd_schemas.py."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import all_versions

from tests.deploy.crd_schemas import SCHEMAS
from tests.deploy.manifests import OVERLAYS, key, one, render

# The three newest minors kubernetes-validate 1.37 ships: 1.37 is current, 1.35 the oldest still
# supported upstream. copack-scheduler's image follows the cluster's minor (docs/install.md).
VERSIONS = ("1.35.0", "1.36.0", "1.37.0")


def validate(obj: dict, version: str) -> None:
    custom = SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if custom is not None:
        jsonschema.Draft202012Validator(custom).validate(obj)
    else:
        kubernetes_validate.validate(obj, version, strict=True)


def test_kubernetes_validate_ships_the_versions_we_target() -> None:
    shipped = {v.rsplit(".", 1)[0] for v in all_versions()}
    assert {v.rsplit(".", 1)[0] for v in VERSIONS} <= shipped, sorted(shipped)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_strictly(overlay: str, version: str) -> None:
    objs = render(overlay)
    errors = []
    for obj in objs:
        try:
            validate(obj, version)
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{key(obj)}: no schema: {e.message}")
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            path = ".".join(str(p) for p in e.absolute_path)
            errors.append(f"{key(obj)}: {path}: {e.message}")
    assert not errors, "\n".join(errors)


def test_prometheus_overlay_has_both_monitors() -> None:
    objs = render("overlays/prometheus")
    kinds = {(o["apiVersion"], o["kind"]) for o in objs if o["apiVersion"].startswith("monitoring")}
    assert kinds == set(SCHEMAS)


@pytest.mark.parametrize(
    ("kind", "name", "mutate", "where"),
    [
        # A typo in a container field: strict mode must refuse it, not drop it.
        ("Deployment", "copack-extender",
         lambda o: o["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
         "imagePullPolicyy"),
        ("DaemonSet", "copack-agent",
         lambda o: o["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
             containerPort="50051"), "containerPort"),
        ("ServiceMonitor", "copack-extender",
         lambda o: o["spec"]["endpoints"][0].update(intervall="15s"), "intervall"),
        ("ServiceMonitor", "copack-extender",
         lambda o: o["spec"]["endpoints"][0].update(scrapeTimeout="10 seconds"), "scrapeTimeout"),
        ("PodMonitor", "copack-agent",
         lambda o: o["spec"]["podMetricsEndpoints"][0].update(scheme="grpc"), "scheme"),
    ],
)
def test_the_validation_catches_broken_manifests(kind, name, mutate, where) -> None:
    obj = copy.deepcopy(one(render("overlays/prometheus"), kind, name))
    validate(obj, VERSIONS[-1])  # intact: passes
    mutate(obj)
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)) as e:
        validate(obj, VERSIONS[-1])
    assert where in str(e.value.message) or where in [str(p) for p in e.value.absolute_path]
