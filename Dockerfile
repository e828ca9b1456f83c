FROM python:3.11-slim

WORKDIR /src
COPY pyproject.toml README.md ./
COPY slotproxy ./slotproxy
COPY loadtest ./loadtest
RUN pip install --no-cache-dir . && rm -rf /src

# A starting config that listens on every interface of the container;
# mount your own over it: -v $PWD/config.toml:/etc/slotproxy/config.toml:ro
COPY config.example.toml /etc/slotproxy/config.toml
RUN sed -i 's/^listen = "127.0.0.1:6432"/listen = "0.0.0.0:6432"/' /etc/slotproxy/config.toml \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin slotproxy

USER slotproxy
EXPOSE 6432
# SIGTERM starts the graceful shutdown: waiters get 57P01, live sessions may finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["slotproxy"]
CMD ["run", "--config", "/etc/slotproxy/config.toml"]
