"""The relabeling model the metrics tests use (tests/relabel.py) behaves as Prometheus does."""

from __future__ import annotations

import pytest

from tests.relabel import relabel

RENAME = {"sourceLabels": ["__name__"], "regex": "ray_pagoda_(.+)", "targetLabel": "__name__",
          "replacement": "pagoda:$1"}


def test_replace_renames_a_full_match_and_keeps_the_other_labels():
    labels = {"__name__": "ray_pagoda_prompt_tokens_total", "model": "m"}
    assert relabel(labels, [RENAME]) == {"__name__": "pagoda:prompt_tokens_total", "model": "m"}


def test_the_regex_is_anchored_at_both_ends():
    assert relabel({"__name__": "x_ray_pagoda_y"}, [RENAME]) == {"__name__": "x_ray_pagoda_y"}
    assert relabel({"__name__": "ray_pagoda_y"}, [{**RENAME, "regex": "ray_pagoda"}]) == {"__name__": "ray_pagoda_y"}


def test_replacement_variables_follow_go_expand():
    name = {"__name__": "ray_pagoda_x"}
    assert relabel(name, [{**RENAME, "replacement": "pagoda:${1}_total"}]) == {"__name__": "pagoda:x_total"}
    assert relabel(name, [{**RENAME, "replacement": "$$$1"}]) == {"__name__": "$x"}
    # $1_total names the group "1_total", which does not exist: the expansion is empty and the label goes
    assert relabel(name, [{**RENAME, "replacement": "$1_total"}]) == {}


def test_defaults_are_action_replace_regex_all_and_replacement_dollar_one():
    rule = {"sourceLabels": ["a", "b"], "targetLabel": "c"}
    assert relabel({"a": "1", "b": "2"}, [rule]) == {"a": "1", "b": "2", "c": "1;2"}


def test_unmodelled_actions_fail_loudly():
    with pytest.raises(ValueError, match="labelmap"):
        relabel({"__name__": "x"}, [{"action": "labelmap", "regex": "(.*)"}])
