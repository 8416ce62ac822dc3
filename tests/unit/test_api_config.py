"""ApiConfig: served model names are one name or several, kept as a tuple; bad ones are refused by field."""

from __future__ import annotations

import pytest

from pagoda.cluster.api.config import ApiConfig


@pytest.mark.parametrize(
    "given, kept",
    [(None, None), ("autoglm-phone-9b", ("autoglm-phone-9b",)), (["a", "b"], ("a", "b")), (("a",), ("a",))],
)
def test_served_model_name_is_normalised_to_a_tuple(given, kept):
    assert ApiConfig(served_model_name=given).served_model_name == kept


@pytest.mark.parametrize("bad", [[], [""], ["a", "a"], ["a", 3], " "])
def test_bad_served_model_names_name_the_field(bad):
    with pytest.raises(ValueError, match="served_model_name"):
        ApiConfig(served_model_name=bad)


def test_replica_transport_defaults_to_grpc_and_rejects_others_by_name():
    assert ApiConfig().replica_transport == "grpc"
    assert ApiConfig(replica_transport="ray").replica_transport == "ray"
    with pytest.raises(ValueError, match="api.replica_transport must be one of grpc, ray, got 'tcp'"):
        ApiConfig.from_dict({"replica_transport": "tcp"})
