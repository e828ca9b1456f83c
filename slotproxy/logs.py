"""Log lines: text for people (the default), JSON for log shippers.

A session's lines carry its connection fields (`conn` and friends, set by
its LoggerAdapter): text puts them in front as `C-17 app@shop 10.0.3.7:51234`,
JSON as separate keys. Workers add `worker`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__(TEXT_FORMAT)
        self.worker = "" if worker is None else f"W{worker} "

    def formatMessage(self, record: logging.LogRecord) -> str:
        prefix = getattr(record, "conn_prefix", None)
        if prefix:
            record.message = f"{prefix} {record.message}"
        return self.worker + super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "conn", None)
        if fields:
            entry.update(fields)
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str, fmt: str = "text", worker: int | None = None) -> None:
    # The formats use none of these, and each costs time on every line.
    logging._srcfile = None  # no caller lookup (a stack walk) per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else TextFormatter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
