"""Release safety (issue 21) on pure functions: MLflow filter strings from user-typed names, the release row's
idempotent detail text."""

from __future__ import annotations

import pytest

from tasks.config import ConfigError, load_config
from tasks.io import tracking
from tasks.release import registry

INJECTION = "ecommerce-chatbot' OR name LIKE '%"


def test_a_quoted_registered_model_name_is_rejected_by_the_config():
    with pytest.raises(ConfigError, match="config field 'release.registered_model': .* does not match"):
        load_config(overrides={"release.registered_model": INJECTION})
    assert load_config(overrides={"release.registered_model": "shop-bot_v2.1"}).release.registered_model == \
        "shop-bot_v2.1"


@pytest.mark.parametrize("value", [INJECTION, 'a"b', "a\\b", "a`b", "a\nb"])
def test_filter_literal_refuses_what_would_change_the_search(value):
    with pytest.raises(ValueError, match="cannot be used in an MLflow search"):
        tracking.filter_literal(value, "registered model name")


def test_filter_literal_quotes_airflow_run_ids():
    assert tracking.filter_literal("manual__2026-12-07T10:00:00+00:00") == "'manual__2026-12-07T10:00:00+00:00'"


class _Client:
    def __init__(self):
        self.filters = []

    def search_model_versions(self, filter_string):
        self.filters.append(filter_string)
        return []


def test_version_of_run_never_sends_a_filter_built_from_a_quoted_name():
    client = _Client()
    with pytest.raises(ValueError):
        registry.version_of_run(client, INJECTION, "run-1")
    assert client.filters == []
    registry.version_of_run(client, "ecommerce-chatbot", "run-1")
    assert client.filters == ["name = 'ecommerce-chatbot'"]
