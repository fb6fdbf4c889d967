"""Shared fixtures: the `device` parametrization, debug checks on, a fresh seed per test."""

from __future__ import annotations

import sys
import zlib

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # pyproject declares it too; registering here keeps `--strict-markers` happy under any config.
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A choice of CUDA prompt-chunk kernel (tests/kernels/test_attention.py: prefill_kernel) means nothing on
    # the CPU: only its first value runs there, the others are deselected (not skipped: GPU runs count skips).
    dropped = [item for item in items if _cpu_duplicate(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not _cpu_duplicate(item)]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _cpu_duplicate(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    return params.get("device") == "cpu" and params.get("prefill_kernel", "wgmma_ws") != "wgmma_ws"


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    if isinstance(val, torch.dtype):  # "bfloat16" rather than "dtype2" in test ids
        return str(val).removeprefix("torch.")
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "gpu" in item.keywords and torch.cuda.is_available():
        from pagedinfer import _ops
        if not _ops.has_cuda_kernels():
            # A GPU run must not pass by testing nothing.
            pytest.fail("a CUDA device is present but pagedinfer._C was built without CUDA kernels "
                        "(PAGEDINFER_CPU_ONLY?): rebuild, or deselect with -m 'not gpu'")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    """Every kernel test runs on the CPU; on CUDA too where a GPU is present (marked `gpu`).
    Tests whose sizes differ by device parametrize `device` themselves (utils.per_device)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Seed from the test id: inputs differ between tests, and a failure reproduces when rerun."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _debug_checks():
    """Range checks on CUDA too, so a bad index is an error rather than an illegal address.
    Tests that capture CUDA graphs switch them off (they copy metadata to the host); this restores.
    Only where the extension is loaded (test modules that use it import it at collection): the
    control-plane tests must not depend on a build, nor fail with a stale one."""
    ops = sys.modules.get("pagedinfer._ops")
    if ops is None:
        yield
        return
    previous = ops.debug_checks_enabled()
    ops.set_debug_checks(True)
    yield
    ops.set_debug_checks(previous)
