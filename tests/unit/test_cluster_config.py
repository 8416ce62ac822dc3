"""The application YAML: defaults, the shipped example, round trips, and errors that name the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pagoda.cluster.config import DEFAULT_REPLICA_QUEUE, AppConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_need_no_file():
    config = load_config(None)
    assert config.deployment.num_replicas == 1 and config.router.policy == "pagoda"
    assert config.engine.model.model.startswith("embedded:")


def test_shipped_example_loads_and_round_trips():
    config = AppConfig.from_yaml(ROOT / "deploy" / "pagoda.yaml")
    assert config.deployment.num_replicas == 2
    assert config.engine.scheduler.max_waiting == 4096
    assert config.max_ongoing_requests == 64 + 4096  # a replica takes what its engine runs and queues
    assert AppConfig.from_dict(config.to_dict()) == config


def test_replica_capacity_follows_the_engine_unless_set():
    assert AppConfig().max_ongoing_requests == 128 + DEFAULT_REPLICA_QUEUE  # max_waiting unset
    assert AppConfig.from_dict({"engine": {"max_num_seqs": 8, "max_waiting": 16}}).max_ongoing_requests == 24
    assert AppConfig.from_dict({"deployment": {"max_ongoing_requests": 5}}).max_ongoing_requests == 5
    assert AppConfig.from_dict({"deployment": {"num_replicas": 3}}).max_replicas == 3
    assert AppConfig.from_dict({"autoscaling": {"enabled": True, "max_replicas": 6}}).max_replicas == 6


def test_autoglm_example_carries_open_autoglms_serving_settings():
    config = AppConfig.from_yaml(ROOT / "deploy" / "autoglm-phone-9b.yaml")
    assert config.engine.model.max_model_len == 25480
    assert config.engine.multimodal.image_resize_max_pixels == 5_000_000
    assert config.engine.multimodal.limit_images_per_prompt == 10
    assert AppConfig.from_dict(config.to_dict()) == config


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AppConfig().router.weights.prefix = 2.0  # type: ignore[misc]


def test_engine_fields_are_flat_and_reach_their_group():
    config = AppConfig.from_dict({"engine": {"max_num_seqs": 8, "block_size": 32, "tensor_parallel_size": 2}})
    assert config.engine.scheduler.max_num_seqs == 8
    assert config.engine.cache.block_size == 32
    assert config.engine.parallel.tensor_parallel_size == 2


def test_tensor_parallel_replicas_default_to_the_ray_executor():
    def backend(engine: dict) -> str:
        config = AppConfig.from_dict({"engine": engine})
        assert AppConfig.from_dict(config.to_dict()) == config
        return config.engine.parallel.distributed_executor_backend

    assert backend({}) == "mp"  # TP = 1 runs in the replica's process; the backend is unused
    assert backend({"tensor_parallel_size": 2}) == "ray"
    assert backend({"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}) == "mp"


def test_replicas_run_their_engine_in_a_process_of_its_own_unless_ray_places_the_ranks():
    def core(engine: dict, deployment: dict | None = None) -> str:
        return AppConfig.from_dict({"engine": engine, "deployment": deployment or {}}).engine_core

    assert core({}) == "process"
    assert core({"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}) == "process"
    assert core({"tensor_parallel_size": 2}) == "thread"  # Ray TP: the ranks are placed from the replica's worker
    assert core({}, {"engine_core": "thread"}) == "thread"
    with pytest.raises(ValueError, match=r"deployment\.engine_core must be 'thread' or 'auto' with engine\."
                                         r"distributed_executor_backend 'ray'"):
        core({"tensor_parallel_size": 2}, {"engine_core": "process"})


def test_numbers_accept_ints_for_floats():
    assert AppConfig.from_dict({"router": {"stats_period_s": 2}}).router.stats_period_s == 2.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rooter": {}}, r"^rooter: unknown field \(known: autoscaling, deployment, engine, router\)"),
        ({"engine": {"max_num_seq": 4}}, r"^engine\.max_num_seq: unknown field"),
        ({"engine": {"max_num_seqs": 0}}, r"^engine\.max_num_seqs must be >= 1, got 0"),
        ({"engine": {"max_num_seqs": "many"}}, r"^engine\.max_num_seqs must be an integer, got 'many'"),
        ({"engine": {"dtype": "int3"}}, r"^engine\.dtype must be one of"),
        ({"engine": {"enable_prefix_caching": "yes"}}, r"^engine\.enable_prefix_caching must be true or false"),
        ({"deployment": {"num_replicas": 0}}, r"^deployment\.num_replicas must be >= 1, got 0"),
        ({"deployment": {"name": "a b"}}, r"^deployment\.name must be letters"),
        ({"deployment": {"engine_core": "fiber"}}, r"^deployment\.engine_core must be one of \('auto', 'thread', 'process'\)"),
        ({"router": {"policy": "random"}}, r"^router\.policy must be one of \('pagoda', 'pow2'\)"),
        ({"router": {"weights": {"prefix": -1}}}, r"^router\.weights\.prefix must be >= 0, got -1"),
        ({"router": {"weights": {"latency": 1}}}, r"^router\.weights\.latency: unknown field"),
        ({"router": {"weights": 3}}, r"^router\.weights must be a mapping"),
        ({"router": {"stats_period_s": 0}}, r"^router\.stats_period_s must be > 0"),
        ({"autoscaling": {"max_replicas": 0}}, r"^autoscaling\.max_replicas must be >= max\(1, min_replicas=1\)"),
        ({"autoscaling": {"enabled": True, "min_replicas": 2}, "deployment": {"num_replicas": 1}},
         r"deployment\.num_replicas \(1\) must be within autoscaling \[min_replicas=2, max_replicas=4\]"),
        ([1, 2], r"config must be a mapping of sections, got list"),
    ],
)
def test_bad_config_names_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        AppConfig.from_dict(data)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        AppConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="does not exist"):
        AppConfig.from_yaml(tmp_path / "missing.yaml")


def test_empty_file_is_the_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert AppConfig.from_yaml(empty) == AppConfig()
