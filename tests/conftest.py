"""Fixtures shared by the tests; the report header says which adapters this run covers."""

from __future__ import annotations

import pytest

from .helpers import HAS_HOOKED, LM_KINDS, TL_VERSION


def pytest_report_header(config):
    return (f"transformer-lens {TL_VERSION}; language-model adapters under test: {', '.join(LM_KINDS)}"
            + ("" if HAS_HOOKED else " (HookedTransformer was removed in TransformerLens 4)"))


@pytest.fixture(params=LM_KINDS)
def lm_kind(request):
    return request.param
