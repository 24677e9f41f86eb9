"""Collect the `bench_*.py` suites when pytest is pointed at bench/ (`pytest tests` never comes here)."""

import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; collecting it here too would
    # run every benchmark twice.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
