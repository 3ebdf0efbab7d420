from tests.distributed.spawn import shutdown_pool


def pytest_sessionfinish(session, exitstatus):
    shutdown_pool()
