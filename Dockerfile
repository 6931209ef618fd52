# mcp-gateway: a security-enforcing MCP gateway.
# Build:  docker build -t mcp-gateway .
# Run:    docker run -p 8080:8080 -v $PWD/gateway.yaml:/etc/mcp-gateway/gateway.yaml:ro mcp-gateway
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin gateway
COPY --from=build /install /usr/local
COPY policies /etc/mcp-gateway/policies
USER 10001
# The public listener; the admin listener (metrics, probes) is 9464 and should
# not be published outside the cluster network.
EXPOSE 8080 9464
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["mcp-gateway"]
CMD ["serve", "-c", "/etc/mcp-gateway/gateway.yaml", "--workers", "2"]
