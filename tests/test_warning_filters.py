"""The deprecation filters of pyproject.toml and tests/conftest.py are in force: a deprecation raised or logged by
transformers fails the test that triggers it."""

import logging
import warnings

import pytest


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
def test_a_deprecation_warning_from_transformers_is_an_error(category: type[Warning]) -> None:
    with pytest.raises(category, match="renamed"):
        warnings.warn_explicit(
            "`x` is renamed", category, "modeling_layers.py", 1, module="transformers.modeling_layers"
        )


def test_a_deprecation_logged_by_transformers_is_an_error() -> None:
    with pytest.raises(FutureWarning, match="deprecated"):
        logging.getLogger("transformers.utils.generic").warning("`past_key_values` is deprecated. Use `cache`.")


def test_other_warnings_from_transformers_stay_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("a hint", UserWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
    assert [str(w.message) for w in caught] == ["a hint"]
