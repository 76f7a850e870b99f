# usage-consumer: Kafka -> ClickHouse -> Stripe usage billing.
#
#   docker build -t usage-consumer:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp usage-consumer:0.1.0 --help
#
# Two stages on one base: the builder compiles the wheel with the C batch decoder, the runtime
# installs it with its dependencies (all binary wheels) and carries no compiler.
# tests/deploy/test_image.py checks this file: hadolint, the facts below, and that the pip
# commands here are the ones tests/integration/test_install.py runs on every `make test`.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

# gcc and the libc headers for consumer/decode/_avrofast.c (the Python headers come with the
# base). The base pins the Debian release; build-essential's version is fixed for all of it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential=12.9 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY consumer ./consumer

# setup.py marks the extension optional, so a failed compile would still produce a wheel,
# a several times slower one. The image must not ship that: fail unless the .so is in it.
RUN python -m pip wheel --no-cache-dir --no-deps -w /wheels . \
    && python -c "import glob, sys, zipfile; names = zipfile.ZipFile(glob.glob('/wheels/usage_consumer-*.whl')[0]).namelist(); sys.exit(not [n for n in names if n.startswith('consumer/decode/_avrofast') and n.endswith('.so')])"


FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
# The repository declares neither; pass them at build time (--build-arg).
ARG SOURCE_URL=""
ARG LICENSES=NOASSERTION

LABEL org.opencontainers.image.title="usage-consumer" \
      org.opencontainers.image.description="Exactly-once Kafka usage events to ClickHouse aggregates and Stripe meter events" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="${LICENSES}" \
      org.opencontainers.image.version="${VERSION}"

# Built to run with a read-only root filesystem and only /tmp writable: no bytecode is
# written at run time (pip compiled it at install), and HOME and caches point at /tmp.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --system --gid 10001 usage-consumer \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin usage-consumer

COPY --from=builder /wheels/ /tmp/wheels/

# Dependencies from the index, as binary wheels. The smoke check imports the compiled
# decoder here, in the stage without a compiler, so a wheel that needs one fails the build.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir /tmp/wheels/usage_consumer-*.whl \
    && rm -rf /tmp/wheels \
    && /opt/venv/bin/usage-consumer --help > /dev/null \
    && /opt/venv/bin/python -c "import consumer.decode._avrofast"

# Relative paths (the chDB default .data/, the demo's .demo/) land on the writable /tmp.
WORKDIR /tmp
USER 10001:10001

# /metrics, /healthz and /readyz (pipeline.metrics_port).
EXPOSE 9108

ENTRYPOINT ["usage-consumer"]
CMD ["run"]
