# Hato as a container: `hato serve` (or any hato command) as a non-root user.
#
#   docker build -t hato .
#   docker run -d --read-only -v hato-data:/var/lib/hato \
#       -v "$PWD/http-token.txt:/run/secrets/hato_http_token:ro" \
#       -p 127.0.0.1:8025:8025 -p 2525:2525 hato
#
# (compose: `secrets: [hato_http_token]`, see examples/compose/docker-compose.yml.)
#
# The only writable place is the data volume /var/lib/hato (queue, users, DKIM keys);
# the root filesystem may be read-only. The HTTP listener binds 0.0.0.0:8025 and
# therefore needs its token: mount it as the secret /run/secrets/hato_http_token (or set
# HATO_HTTP_TOKEN). HEALTHCHECK runs `hato health` against it. See docs/monitoring.md.
FROM python:3.11-slim AS build
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels "./[fast,postgres,redis]"

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-compile /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10025 --user-group --home-dir /var/lib/hato --no-create-home hato \
    && mkdir -p /var/lib/hato \
    && chown hato:hato /var/lib/hato \
    && chmod 0700 /var/lib/hato
ENV HATO_DATA_DIR=/var/lib/hato \
    HATO_LISTEN=0.0.0.0:2525 \
    HATO_HTTP_LISTEN=0.0.0.0:8025 \
    HATO_HTTP_TOKEN_FILE=/run/secrets/hato_http_token \
    HOME=/var/lib/hato \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/hato"]
WORKDIR /var/lib/hato
USER hato
EXPOSE 2525 8025
HEALTHCHECK --interval=30s --timeout=10s --start-period=15s --retries=3 CMD ["hato", "health"]
ENTRYPOINT ["hato"]
CMD ["serve"]
