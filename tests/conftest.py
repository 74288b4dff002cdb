"""Fixtures shared by the tests; the report header says which adapters this run covers."""

from __future__ import annotations

import pytest

from .helpers import HAS_HOOKED, LM_KINDS, TL_VERSION


def pytest_report_header(config):
    return (f"transformer-lens {TL_VERSION}; language-model adapters under test: {', '.join(LM_KINDS)}"
            + ("" if HAS_HOOKED else " (HookedTransformer was removed in TransformerLens 4)"))


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any model is loaded (the CLI's checks must come first)."""
    import l3d_lens.cli as cli
    from l3d_lens.zoo import induction

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", refuse)
    monkeypatch.setattr(induction, "load", refuse)


@pytest.fixture(params=LM_KINDS)
def lm_kind(request):
    return request.param
