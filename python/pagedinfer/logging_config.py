"""The package's log lines (KV-cache sizing, CUDA-graph capture, server start) on stderr by default, as
vLLM shows its own: a handler on the `pagedinfer` logger at INFO, added once at import.

PAGEDINFER_CONFIGURE_LOGGING=0 leaves logging to the application. Records still propagate to the root
logger (pytest's caplog and application handlers see them); an application that also prints the
root logger's INFO records sets the variable to avoid seeing them twice.
"""

from __future__ import annotations

import logging
import os

FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


def configure_package_logging() -> None:
    if os.environ.get("PAGEDINFER_CONFIGURE_LOGGING", "1") == "0":
        return
    logger = logging.getLogger("pagedinfer")
    if logger.handlers:
        return
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
