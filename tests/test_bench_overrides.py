"""bench.search_quality's --set parsing: typed, validated search.* overrides; bad keys/values are named."""
import pytest

from bench.search_quality import overrides
from pgprune.config import SearchParams
from pgprune.errors import ConfigError


def test_overrides_are_typed_and_validated():
    base = SearchParams()
    upd = overrides(["init_free_heads=0", "lr_heads=0.2", "granularity=[\"heads\"]", "select=last"], base)
    assert upd == {"init_free_heads": 0.0, "lr_heads": 0.2, "granularity": ["heads"], "select": "last"}
    assert isinstance(upd["init_free_heads"], float)
    with pytest.raises(ConfigError, match="'foo=1'.*init_free_heads"):
        overrides(["foo=1"], base)
    with pytest.raises(Exception, match="init_free_heads"):
        overrides(["init_free_heads=1.5"], base)
