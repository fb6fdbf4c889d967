"""pagedinfer's INFO lines reach stderr by default (as vLLM's do), and not with PAGEDINFER_CONFIGURE_LOGGING=0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = ("import logging, pagedinfer; logging.getLogger('pagedinfer.worker.x').info('blocks: 42'); "
          "logging.getLogger('pagedinfer.worker.x').info('blocks: 42')")


def stderr_of(configure: str) -> str:
    env = {**os.environ, "PAGEDINFER_CONFIGURE_LOGGING": configure}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=120, check=True).stderr


@pytest.mark.parametrize("configure, lines", [("1", 2), ("0", 0)])
def test_package_info_lines_on_stderr(configure: str, lines: int) -> None:
    err = stderr_of(configure)
    assert err.count("INFO") == err.count("pagedinfer.worker.x: blocks: 42") == lines  # once each
