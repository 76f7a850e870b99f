"""docs/configuration.md's reference tables are the configuration model's own."""

from __future__ import annotations

from consumer.config import PipelineConfig, StripeConfig
from tests.support.config_doc import BEGIN, PAGE, page_with, render


def test_the_page_holds_the_reference_made_from_the_code() -> None:
    page = PAGE.read_text()
    assert BEGIN in page, "run: python -m tests.support.config_doc --write"
    assert page_with(render(), page) == page, "run: python -m tests.support.config_doc --write"


def test_every_field_and_emulator_option_is_in_the_reference() -> None:
    text = render()
    for model in (PipelineConfig, StripeConfig):
        for name in model.model_fields:
            assert f"`{name}`" in text, name
    assert "`USAGE_CONSUMER_SCHEMA__FAST_DECODER`" in text
    assert "`--reset-rate`" in text and "`--duplicate-answer`" in text


def test_a_page_that_lags_the_code_is_caught() -> None:
    page = page_with(render(), PAGE.read_text())
    stale = page.replace("`USAGE_CONSUMER_PIPELINE__ROLLUP_THREADS`", "`OLD_NAME`")
    assert page_with(render(), stale) != stale
