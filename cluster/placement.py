"""Where one engine's tensor-parallel ranks run: the placement-group layout, in one place.

    bundle 0       the engine itself (the Serve replica: scheduler, KV block manager), CPUs only
    bundle i + 1   tensor-parallel rank i: {"GPU": 1} on CUDA, {"CPU": 1} on CPU
    strategy       STRICT_PACK: every bundle on one node, so collectives stay on NVLink / loopback

``pagoda.cluster.app`` asks Serve for this layout (``placement_group_bundles``; Serve puts the replica in
bundle 0 and keeps the group for the replica's life). ``RayExecutor`` reads it back with
``place_ranks``: inside such a group it schedules rank i into bundle i + 1; outside any group (a
script, a test) it reserves a STRICT_PACK group of k rank bundles itself and removes it on release.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util import placement_group, placement_group_table, remove_placement_group
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

STRATEGY = "STRICT_PACK"


def rank_bundle(gpu: bool) -> dict[str, float]:
    return {"GPU": 1.0} if gpu else {"CPU": 1.0}


def replica_bundles(tensor_parallel_size: int, gpu: bool, engine_cpus: float) -> list[dict[str, float]]:
    """The bundles a Serve replica with TP = k reserves: the engine's, then one per rank."""
    return [{"CPU": float(engine_cpus)}] + [rank_bundle(gpu) for _ in range(tensor_parallel_size)]


@dataclass
class RankPlacement:
    """A placement group and which of its bundles hold the ranks."""

    group: PlacementGroup
    first_bundle: int  # rank i runs in bundle first_bundle + i
    owned: bool  # reserved by the executor (removed on release), not the caller's
    gpu: bool  # rank bundles hold one GPU each; otherwise one CPU

    def actor_options(self, rank: int) -> dict:
        """``RankActor.options(...)`` for ``rank``: exactly its bundle's resource, in its bundle."""
        return {
            "num_cpus": 0 if self.gpu else 1,
            "num_gpus": 1 if self.gpu else 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=self.first_bundle + rank
            ),
        }

    def release(self) -> None:
        """Remove the group if the executor reserved it; a caller's group stays (Serve owns it)."""
        if self.owned:
            remove_placement_group(self.group)


def place_ranks(world_size: int, device: str, timeout_s: float) -> RankPlacement:
    """The caller's placement group when it runs in one (bundles 1..k), else a new STRICT_PACK group.

    Raises ValueError when the layout cannot host ``world_size`` ranks on ``device`` (a config
    error), TimeoutError when the cluster has the resources but not free on one node in time.
    """
    current = get_current_placement_group()
    if current is not None:
        return _inside(current, world_size, device)
    return _reserve(world_size, device, timeout_s)


def _inside(group: PlacementGroup, world_size: int, device: str) -> RankPlacement:
    bundles = placement_group_table(group)["bundles"]  # {index: {resource: amount}}
    if len(bundles) < world_size + 1:
        raise ValueError(
            f"tensor_parallel_size ({world_size}) needs {world_size + 1} bundles in the caller's placement group "
            f"(bundle 0 for the engine, one per rank), it has {len(bundles)}"
        )
    gpu = all(bundles[i + 1].get("GPU", 0) >= 1 for i in range(world_size))
    if device == "cuda" and not gpu:
        raise ValueError(f"device is 'cuda' but bundles 1..{world_size} of the caller's placement group "
                         f"do not each hold a GPU: {[bundles[i + 1] for i in range(world_size)]}")
    if device == "cpu" and gpu:
        raise ValueError("device is 'cpu' but the caller's placement group reserves a GPU per rank")
    return RankPlacement(group, first_bundle=1, owned=False, gpu=gpu)


def _reserve(world_size: int, device: str, timeout_s: float) -> RankPlacement:
    available = ray.cluster_resources()
    gpu = device == "cuda" or (device == "auto" and available.get("GPU", 0) >= 1)
    resource = "GPU" if gpu else "CPU"
    if available.get(resource, 0) < world_size:
        raise ValueError(
            f"tensor_parallel_size ({world_size}) needs {world_size} {resource}s in the Ray cluster, "
            f"which has {available.get(resource, 0):g}"
        )
    group = placement_group([rank_bundle(gpu) for _ in range(world_size)], strategy=STRATEGY)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise TimeoutError(
            f"could not reserve {world_size} x {rank_bundle(gpu)} on one node ({STRATEGY}) within {timeout_s:.0f} s"
        )
    return RankPlacement(group, first_bundle=0, owned=True, gpu=gpu)
