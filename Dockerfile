# The compiled per-chunk code (slotproxy/_walker.c) needs a C compiler; the
# image that runs does without one.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY slotproxy ./slotproxy
COPY loadtest ./loadtest
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
# The import check fails the build if the walker was left out (it is optional at install).
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && python -c "import slotproxy._walker"
# A starting config: clients on every interface of the container, the admin
# endpoints on the container's loopback (for the HEALTHCHECK). Mount your own:
#   -v $PWD/config.toml:/etc/slotproxy/config.toml:ro
# and set [admin] listen = "0.0.0.0:6433" to scrape /metrics from outside.
COPY config.example.toml /etc/slotproxy/config.toml
RUN sed -i -e 's/^listen = "127.0.0.1:6432"/listen = "0.0.0.0:6432"/' \
           -e 's/^listen = ""/listen = "127.0.0.1:6433"/' /etc/slotproxy/config.toml \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin slotproxy

USER slotproxy
EXPOSE 6432 6433
# SIGTERM starts the graceful shutdown: waiters get 57P01, live sessions may finish.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["slotproxy", "health", "--config", "/etc/slotproxy/config.toml"]
ENTRYPOINT ["slotproxy"]
CMD ["run", "--config", "/etc/slotproxy/config.toml"]
