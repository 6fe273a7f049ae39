"""Fixtures of the engine's tests."""

from fakes.megatron import fake_megatron  # noqa: F401 (a fixture: a stand-in megatron.core.enums module)
