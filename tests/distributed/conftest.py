"""Orders the distributed tests by the process group they need, so each group is spawned once.

Tests say which with `@pytest.mark.world_size(n)` (or `world_size(n, pool="...")` for a group with other
settings); `spawn.distributed` adds the mark itself. Only this directory's tests move, and only among
their own slots in the session's order.
"""

from pathlib import Path

from tests.distributed.spawn import shutdown_pool

_HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "world_size(n, pool=''): gloo process group size a distributed test uses")


def _pool_key(item):
    mark = item.get_closest_marker("world_size")
    if mark is None:
        return (0, "")
    return (mark.args[0], mark.kwargs.get("pool", ""))


def pytest_collection_modifyitems(session, config, items):
    slots = [i for i, item in enumerate(items) if _HERE in Path(str(item.path)).resolve().parents]
    ordered = sorted((items[i] for i in slots), key=_pool_key)
    for i, item in zip(slots, ordered):
        items[i] = item


def pytest_sessionfinish(session, exitstatus):
    shutdown_pool()
