FROM python:3.11-slim

WORKDIR /src
COPY pyproject.toml README.md ./
COPY slotproxy ./slotproxy
COPY loadtest ./loadtest
RUN pip install --no-cache-dir . && rm -rf /src

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
