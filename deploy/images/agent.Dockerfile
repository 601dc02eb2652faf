# syntax=docker/dockerfile:1
# The copack node agent: NVML sampler, gRPC telemetry, Prometheus exporter, inventory publisher
# and device plugin. Build from the repository root:
#   docker build -f deploy/images/agent.Dockerfile -t ghcr.io/copack/agent:0.1.0 .
# NVML (libnvidia-ml.so.1) is not in the image: the NVIDIA container runtime mounts the host
# driver's copy (runtimeClassName: nvidia, NVIDIA_DRIVER_CAPABILITIES=utility).
FROM python:3.11.14-slim-trixie

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY deploy/images/requirements.lock deploy/images/build-requirements.lock /tmp/
RUN python -m pip install --no-deps -r /tmp/requirements.lock -r /tmp/build-requirements.lock \
    && rm /tmp/requirements.lock /tmp/build-requirements.lock

WORKDIR /src
COPY pyproject.toml README.md ./
COPY copack ./copack
COPY policies ./policies
COPY workloads ./workloads
COPY extender ./extender
COPY node_agent ./node_agent
COPY sim ./sim
COPY rebalancer ./rebalancer
RUN python -m pip install --no-deps --no-build-isolation . \
    && python -m pip check \
    && rm -rf /src \
    && copack --help > /dev/null

WORKDIR /
# checkov:skip=CKV_DOCKER_2: Kubernetes ignores HEALTHCHECK; the DaemonSet probes the metrics and gRPC ports (deploy/base/agent.yaml).
# Non-root by default, so the image runs unprivileged anywhere (e.g. metrics and gRPC only,
# outside Kubernetes). The DaemonSet overrides this with uid 0 and no capabilities, because
# kubelet's device-plugin socket directory belongs to root (see the reasons in agent.yaml).
USER 65532:65532
EXPOSE 50051 9400
ENTRYPOINT ["copack"]
CMD ["agent", "run"]
