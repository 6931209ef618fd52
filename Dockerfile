# mcp-gateway: a security-enforcing MCP gateway.
# Build:  docker build -t mcp-gateway .
# Run:    docker run --read-only -p 8080:8080 \
#           -v $PWD/gateway.yaml:/etc/mcp-gateway/gateway.yaml:ro mcp-gateway
#
# Every dependency comes from requirements.lock (hashes checked, nothing resolved at
# build time); the project's own wheel is built from this checkout with the setuptools
# pinned in requirements-build.lock.

# ---------------------------------------------------------------- build: a wheel and a venv
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements-build.lock requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && python -m venv /opt/mcp-gateway \
 && /opt/mcp-gateway/bin/pip install --require-hashes --no-deps -r requirements.lock \
 && /opt/mcp-gateway/bin/pip install --no-deps /wheels/*.whl \
 && /opt/mcp-gateway/bin/pip uninstall --yes pip \
 && /opt/mcp-gateway/bin/python -m compileall -q /opt/mcp-gateway

# ---------------------------------------------------------------- runtime: no compiler, no pip
FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
 && mkdir -p /run/mcpgw && chown 10001:10001 /run/mcpgw && chmod 0700 /run/mcpgw
COPY --from=build /opt/mcp-gateway /opt/mcp-gateway
COPY policies /etc/mcp-gateway/policies
# A read-only root filesystem is the expected way to run this image: bytecode was compiled
# at build time, and --workers writes its shared metric files to /run/mcpgw, a volume
# (writable even under --read-only; Kubernetes and compose mount an in-memory one there).
ENV PATH=/opt/mcp-gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MCPGW_METRICS_DIR=/run/mcpgw
VOLUME ["/run/mcpgw"]
USER 10001:10001
# The public listener; the admin listener (metrics, probes) is 9464 and should
# not be published outside the cluster network.
EXPOSE 8080 9464
# Liveness only (the admin listener answers): /readyz also fails while Redis or an upstream
# is down, which is a reason to take a replica out of a load balancer, not to restart it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2).status == 200 else 1)"]
# Exec form: the gateway is PID 1 and receives SIGTERM itself; it stops accepting, waits
# shutdown_delay for load balancers to notice, then drains in-flight requests for up to
# shutdown_grace (stop timeouts must exceed their sum: compose stop_grace_period 45s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["mcp-gateway"]
CMD ["serve", "-c", "/etc/mcp-gateway/gateway.yaml", "--workers", "2"]
