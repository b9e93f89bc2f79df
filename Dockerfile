# syntax=docker/dockerfile:1
# Tether: one image for `tether sidecar`, `tether control-plane`, `tether sessions` and the
# example MCP server (`python -m tether.demo_server`).
#
#   docker build -t tether:dev .
#   docker run --rm tether:dev --help
#
# Two stages: the first builds a wheel and installs it with its dependencies into a virtual
# environment (`tether[demo]`: the example MCP server runs from the same image), every
# dependency at the version `constraints.txt` pins, so rebuilding the same commit gives the
# same image; the second copies only that environment onto a fresh slim base, so pip's cache,
# the source tree and any build tooling never reach the final image (pip and setuptools are
# removed from the environment once it is complete). Every dependency ships manylinux wheels
# for CPython 3.11; the only compiling is Tether's own: the run core (sidecar/_runcore.c, the
# bulk path's per-event loops in C, always built) and the event-path cores (mypyc, setup.py
# TETHER_MYPYC=1: the same code, faster); the compiler and mypy stay in the build stage.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# TETHER_MYPYC=0 leaves the mypyc build out (the run core is still compiled).
ARG TETHER_MYPYC=1
# Python's headers ship with the official image; a Debian-python base needs python3-dev.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && { [ -f "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
      || apt-get install -y --no-install-recommends python3-dev; } \
 && rm -rf /var/lib/apt/lists/*
# Build tools live in a venv of their own; the runtime venv gets only the wheel.
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install "mypy>=1.10" "setuptools>=68" wheel
# The venv lives at the same path in both stages: its scripts' shebangs are absolute.
RUN python -m venv /opt/tether
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY tether ./tether
COPY sidecar ./sidecar
COPY controlplane ./controlplane
RUN TETHER_MYPYC=${TETHER_MYPYC} /opt/build/bin/pip wheel --no-build-isolation --no-deps \
        --wheel-dir /wheels . \
 && /opt/tether/bin/pip install --constraint constraints.txt "$(ls /wheels/tether-*.whl)[demo,tracing]" \
 && /opt/tether/bin/python -m pip uninstall -q -y pip setuptools \
 && /opt/tether/bin/python -m compileall -q /opt/tether

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="tether" \
      org.opencontainers.image.description="Keeps MCP sessions and SSE streams alive" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, so Kubernetes can check `runAsNonRoot` without resolving names;
# the manifests in deploy/ run with the same ids and a read-only root filesystem.
RUN groupadd --system --gid 10001 tether \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin tether
COPY --from=build /opt/tether /opt/tether
ENV PATH=/opt/tether/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# Sidecar proxied and admin ports, control plane gRPC, example MCP server (documentation only).
EXPOSE 8080 9090 50051 3000
ENTRYPOINT ["tether"]
CMD ["--help"]
