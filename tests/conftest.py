"""Shared pytest fixtures for migsec."""
import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked ``lab`` skip, saying why, where the two-host lab cannot run."""
    lab_items = [item for item in items if "lab" in item.keywords]
    if not lab_items:
        return
    from migsec.lab.lab import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        for item in lab_items:
            item.add_marker(pytest.mark.skip(reason=reason))
