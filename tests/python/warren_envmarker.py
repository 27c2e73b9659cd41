"""pytest plugin: the `-E NAME` option and `env`/`flaky` markers used by py-amqp's and kombu's
integration suites.

Both projects define these in a conftest.py at the root of their git repositories, which is not
part of their sdists. Semantics (as upstream): a test marked `@pytest.mark.env("x")` runs only
when `-E x` is given, otherwise it is skipped.
Loaded with `-p warren_envmarker` (tests/python on PYTHONPATH).
"""
import pytest


def pytest_addoption(parser):
    parser.addoption(
        "-E",
        action="append",
        metavar="NAME",
        default=None,
        help="only run tests marked env(NAME) for one of the given NAMEs",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "env(name): run only with -E name")
    # Registered here too so that running without pytest-rerunfailures does not warn.
    config.addinivalue_line("markers", "flaky(reruns, reruns_delay): rerun a failing test")


def pytest_runtest_setup(item):
    wanted = item.config.getoption("-E") or []
    envs = [m.args[0] for m in item.iter_markers(name="env")]
    if envs and not set(envs) & set(wanted):
        pytest.skip(f"test requires env in {envs!r}")
