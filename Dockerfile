# vk-provider: the node agent as a container image.
#   docker build -t vk-provider:dev .
#   docker compose up -d            (beside a kind cluster; see docs/kind.md)
#   kind load docker-image vk-provider:dev --name vk && kubectl apply -f deploy/   (inside it)
#
# The registry database and the generated serving certificate live on the volume
# /var/lib/vk-provider. tests/unit/test_packaging.py checks what it can without a container
# engine: every file copied here exists and is not excluded by .dockerignore, the command runs,
# and the image's environment is a valid configuration.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# openssl makes the kubelet endpoint's self-signed certificate at start; sqlite3 lets you query
# the registry in place: docker compose exec agent sqlite3 -readonly /var/lib/vk-provider/registry.db
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssl sqlite3 \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid, so Kubernetes can check runAsNonRoot and volumes can be owned by it.
RUN groupadd --system --gid 10001 vk \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/vk-provider --no-create-home \
       --shell /usr/sbin/nologin vk

# The package finds its Alembic migrations (migrations/) and the shipped image catalog
# (config/images.yaml) beside itself, as in a checkout, so the tree keeps that layout in /app
# and the package is installed from there in editable mode.
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY vk_provider/ vk_provider/
COPY migrations/ migrations/
COPY config/ config/
RUN python -m venv /opt/vk-provider \
    && /opt/vk-provider/bin/pip install --editable /app \
    && /opt/vk-provider/bin/python -m compileall -q /app/vk_provider /app/migrations \
    && mkdir -p /var/lib/vk-provider \
    && chown 10001:10001 /var/lib/vk-provider
ENV PATH=/opt/vk-provider/bin:$PATH

# Defaults for a container; every one can be overridden (VK_PROVIDER_<GROUP>_<FIELD>, or flags).
# node.internal_ip "auto": the container's own address ($POD_IP, else the default route's interface).
ENV VK_PROVIDER_REGISTRY_DB=/var/lib/vk-provider/registry.db \
    VK_PROVIDER_KUBELET_CERT_DIR=/var/lib/vk-provider/certs \
    VK_PROVIDER_NODE_INTERNAL_IP=auto

# A new named volume is initialised from this directory, so it starts out owned by the agent.
VOLUME ["/var/lib/vk-provider"]
WORKDIR /var/lib/vk-provider
USER 10001:10001

# The kubelet-style HTTPS endpoint (kubectl logs, /pods, /metrics); /healthz needs no credentials.
EXPOSE 10250
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import ssl, urllib.request; urllib.request.urlopen('https://127.0.0.1:10250/healthz', context=ssl._create_unverified_context(), timeout=4)"]

ENTRYPOINT ["vk-provider"]
CMD ["run"]
