from __future__ import annotations

import os
from collections.abc import Iterator

# Two pytest-xdist workers on a 2-core machine: one torch thread each. Oversubscribed OpenMP threads spin and make
# training steps many times slower. Set before torch is imported, so subprocesses (SIGKILL, accelerate) inherit it
# and compute with the same thread count (the same float summation order) as the test.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

try:  # `tests/` on sys.path (pytest's default import mode, no `tests/__init__.py`)
    from hub_server import HubServer, serve_hub
except ImportError:  # `tests` imported as a package
    from tests.hub_server import HubServer, serve_hub


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and a busy shared machine makes two spinning OpenMP threads crawl
    (use it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A local, in-memory Hub on 127.0.0.1 that the real `huggingface_hub` / `transformers` clients talk to.

    For the test, HF_ENDPOINT (= `hub_server.url`), HF_TOKEN (= `hub_server.token`, user `hub_server.username`),
    HF_HUB_DISABLE_XET=1, HF_HUB_OFFLINE=0 and a fresh HF_HOME / HF_HUB_CACHE (`hub_server.hf_home`,
    `hub_server.hub_cache`) are set, together with the copies `huggingface_hub` made of them at import time.
    Fails the test at teardown if the server itself raised (a bug in `tests/hub_server.py`).
    See `tests/hub_server.py`.
    """
    server = None
    for server in serve_hub(monkeypatch, tmp_path_factory.mktemp("hf_home")):
        yield server
    assert server is not None and not server.errors, "hub_server raised internally:\n" + "\n".join(server.errors)
