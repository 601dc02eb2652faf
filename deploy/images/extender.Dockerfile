# syntax=docker/dockerfile:1
# The copack extender (and the dev overlay's TLS bootstrap Job).
# Build from the repository root:
#   docker build -f deploy/images/extender.Dockerfile -t ghcr.io/copack/extender:0.1.0 .
FROM python:3.11.14-slim-trixie

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Exact pins (deploy/images/lock.sh): the runtime dependencies and what building the wheel needs,
# --no-deps and no build isolation so nothing unpinned slips in; `pip check` then proves the
# pinned set complete and consistent.
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
# The TLS bootstrap Job (dev overlay) shells out to openssl, which Debian's ca-certificates
# package brings in: fail the build rather than the Job if that ever changes.
RUN python -m pip install --no-deps --no-build-isolation . \
    && python -m pip check \
    && rm -rf /src \
    && openssl version \
    && copack --help > /dev/null

WORKDIR /
# checkov:skip=CKV_DOCKER_2: Kubernetes ignores HEALTHCHECK; liveness and readiness probes on /healthz and /readyz are in deploy/base/extender.yaml.
USER 65532:65532
EXPOSE 8443
ENTRYPOINT ["copack"]
CMD ["extender", "serve", "--config", "/etc/copack/config/extender.yaml"]
