"""Fixtures for migsec.crypto tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from migsec.crypto import SigningKey

DATA = Path(__file__).resolve().parent.parent / "data" / "crypto"


@pytest.fixture(scope="session")
def vectors() -> dict:
    return json.loads((DATA / "vectors.json").read_text())


# Key generation (RSA-3072 especially) is slow; one key per kind for the session.
@pytest.fixture(scope="session")
def keys() -> dict[str, SigningKey]:
    return {kind: SigningKey.generate(kind) for kind in ("ec-p256", "ed25519", "rsa-3072")}
