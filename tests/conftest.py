"""Fixtures shared by all tests: real brokers on free loopback ports.

Every broker fixture starts its own broker process for one test and stops it after,
so tests never share retained messages, sessions or wills. Mosquitto is never
optional: without the binary its fixtures raise ``BrokerUnavailable`` and the tests
that use them fail (``.ci/run`` installs it).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from wattmesh.broker import BrokerHandle, start_broker


@pytest.fixture
async def embedded_broker() -> AsyncIterator[BrokerHandle]:
    """A started embedded amqtt broker on a free loopback port."""
    async with start_broker("embedded") as broker:
        yield broker


@pytest.fixture
async def mosquitto_broker() -> AsyncIterator[BrokerHandle]:
    """A started Mosquitto with a generated config on a free loopback port.

    Mark tests using it ``@pytest.mark.mosquitto``.
    """
    async with start_broker("mosquitto") as broker:
        yield broker


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Each broker kind in turn, for tests that start brokers themselves."""
    kind: str = request.param
    return kind


@pytest.fixture
async def any_broker(broker_kind: str) -> AsyncIterator[BrokerHandle]:
    """A started broker of each kind in turn (the test runs once per kind)."""
    async with start_broker(broker_kind) as broker:
        yield broker


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix no other test uses, e.g. ``test/3f2a9c01b7e4``."""
    return f"test/{uuid.uuid4().hex[:12]}"
