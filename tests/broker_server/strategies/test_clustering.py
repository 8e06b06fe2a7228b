"""Clustered FL: grouping updates by direction, and the device -> cluster assignments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.strategies import ROOT_CLUSTER, ClusterAssignments, ClusterConfig, cluster_updates, cosine_similarity
from edge_agent.errors import ConfigError


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(labels == label).tolist()) for label in np.unique(labels)}


def two_groups(seed: int, size_a: int, size_b: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Updates along ``u`` (group 0) and ``-u`` (group 1), each with 20 % noise, interleaved."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    truth = rng.permutation(np.array([0] * size_a + [1] * size_b))
    signs = np.where(truth == 0, 1.0, -1.0)
    scales = rng.uniform(0.5, 5.0, size=len(truth))  # magnitude must not matter, only direction
    noise = rng.normal(size=(len(truth), dim)) * 0.2 / np.sqrt(dim)
    return (signs[:, None] * direction + noise) * scales[:, None], truth


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size_a=st.integers(1, 8), size_b=st.integers(1, 8), data=st.data())
def test_opposite_groups_are_separated_and_permutation_does_not_change_the_partition(
    seed: int, size_a: int, size_b: int, data: st.DataObject
) -> None:
    updates, truth = two_groups(seed, size_a, size_b)
    labels = cluster_updates(updates, max_clusters=4, threshold=0.0)
    assert partition(labels) == partition(truth)
    assert labels[0] == 0  # labels are numbered by first member

    order = np.array(data.draw(st.permutations(range(len(truth)))))
    permuted = cluster_updates(updates[order], max_clusters=4, threshold=0.0)
    # update i of the permuted input is update order[i] of the original
    assert {frozenset(order[sorted(group)].tolist()) for group in partition(permuted)} == partition(labels)


def test_similar_updates_stay_one_cluster() -> None:
    rng = np.random.default_rng(0)
    updates = np.ones((6, 8)) + rng.normal(size=(6, 8)) * 0.1
    np.testing.assert_array_equal(cluster_updates(updates, max_clusters=3, threshold=0.0), np.zeros(6))


def test_max_clusters_forces_the_closest_groups_together() -> None:
    # three orthogonal directions, two updates each; 0 and 1 overlap a little, so they merge first
    e = np.eye(3)
    updates = np.array([e[0], e[0], e[1] + 0.2 * e[0], e[1], e[2], e[2]])
    assert partition(cluster_updates(updates, max_clusters=3, threshold=0.5)) == {
        frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5}),
    }  # fmt: skip
    labels = cluster_updates(updates, max_clusters=2, threshold=0.5)
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(cluster_updates(updates, max_clusters=1, threshold=-1.0), np.zeros(6))


def test_threshold_decides_whether_weakly_related_groups_merge() -> None:
    a, b = np.array([1.0, 0.0]), np.array([0.6, 0.8])  # cosine 0.6
    updates = np.array([a, a, b, b])
    assert len(set(cluster_updates(updates, max_clusters=2, threshold=0.5).tolist())) == 1
    assert len(set(cluster_updates(updates, max_clusters=2, threshold=0.7).tolist())) == 2


def test_tensor_sets_cluster_like_their_flattened_matrix() -> None:
    updates, _ = two_groups(seed=3, size_a=3, size_b=4, dim=10)
    sets = [{"w": row[:6].reshape(2, 3).astype(np.float32), "b": row[6:].astype(np.float32)} for row in updates]
    flat = np.array([np.concatenate([s["b"].ravel(), s["w"].ravel()]) for s in sets])  # any fixed order
    np.testing.assert_allclose(cosine_similarity(sets), cosine_similarity(flat), atol=1e-12)
    np.testing.assert_array_equal(
        cluster_updates(sets, max_clusters=2, threshold=0.0), cluster_updates(flat, max_clusters=2, threshold=0.0)
    )


def test_zero_updates_have_no_direction() -> None:
    sim = cosine_similarity(np.array([[0.0, 0.0], [1.0, 0.0], [-2.0, 0.0]]))
    np.testing.assert_array_equal(sim, [[1, 0, 0], [0, 1, -1], [0, -1, 1]])
    assert cluster_updates(np.zeros((0, 3)), max_clusters=2, threshold=0.0).shape == (0,)
    np.testing.assert_array_equal(cluster_updates(np.ones((1, 3)), max_clusters=2, threshold=0.0), [0])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        cosine_similarity([{"w": np.zeros(2)}, {"w": np.zeros(3)}])
    with pytest.raises(ValueError, match="tensors"):
        cosine_similarity([{"w": np.zeros(2)}, {"v": np.zeros(2)}])
    with pytest.raises(ValueError, match="2-D"):
        cosine_similarity(np.zeros(3))
    with pytest.raises(ValueError, match="max_clusters"):
        cluster_updates(np.ones((2, 2)), max_clusters=0, threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        cluster_updates(np.ones((2, 2)), max_clusters=2, threshold=float("nan"))


def test_memory_bound_is_devices_times_model() -> None:
    config = ClusterConfig(max_devices=64)
    assert config.memory_bytes(1_000_000) == 64 * 4_000_000 + 2 * 64 * 64 * 8


# -- assignments ---------------------------------------------------------------------------------


def test_split_keeps_the_largest_group_in_the_parent_and_forks_the_rest() -> None:
    clusters = ClusterAssignments()
    assert clusters.cluster_of("anyone") == ROOT_CLUSTER and clusters.clusters() == (0,)
    forks = clusters.split(0, ["d3", "d1", "d2", "d4", "d5"], [0, 1, 1, 2, 1])
    # groups {d1, d2, d5} (largest: keeps 0), {d3} and {d4}: fresh ids in order of smallest device id
    assert forks == {1: 0, 2: 0}
    assert [clusters.cluster_of(d) for d in ("d1", "d2", "d3", "d4", "d5")] == [0, 0, 1, 2, 0]
    assert clusters.members(0) == ("d1", "d2", "d5") and clusters.clusters() == (0, 1, 2)
    # a later split of cluster 1 gets id 3, never reusing one
    clusters.assign("d6", 1)
    assert clusters.split(1, ["d3", "d6"], [0, 1]) == {3: 1}
    assert clusters.cluster_of("d6") == 3


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=1, max_size=10), data=st.data())
def test_split_does_not_depend_on_device_order(labels: list[int], data: st.DataObject) -> None:
    devices = [f"dev{i:02d}" for i in range(len(labels))]
    order = data.draw(st.permutations(range(len(labels))))
    a, b = ClusterAssignments(), ClusterAssignments()
    forks_a = a.split(0, devices, labels)
    forks_b = b.split(0, [devices[i] for i in order], [labels[i] for i in order])
    assert forks_a == forks_b and a.to_json() == b.to_json()
    assert len(forks_a) == len(set(labels)) - 1


def test_split_refuses_devices_of_another_cluster_and_mismatched_labels() -> None:
    clusters = ClusterAssignments({"d1": 1}, next_id=2)
    with pytest.raises(ValueError, match="not in cluster 0"):
        clusters.split(0, ["d1", "d2"], [0, 1])
    with pytest.raises(ValueError, match="one label per device"):
        clusters.split(1, ["d1"], [0, 1])
    with pytest.raises(ValueError, match="never created"):
        clusters.assign("d2", 5)


def test_assignments_round_trip_through_json() -> None:
    clusters = ClusterAssignments()
    clusters.split(0, ["a", "b", "c"], [0, 0, 1])
    restored = ClusterAssignments.from_json(json.loads(json.dumps(clusters.to_json())))
    assert restored.to_json() == clusters.to_json() == {"format": 1, "next_id": 2, "devices": {"a": 0, "b": 0, "c": 1}}
    assert restored.split(0, ["a", "b"], [0, 1]) == {2: 0}  # the counter survived: no id reused


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"format": 2, "next_id": 1, "devices": {}}, "format"),
        ({"format": 1, "next_id": 1, "devices": {"d": -1}}, "devices"),
        ({"format": 1, "next_id": 1, "devices": {"d": True}}, "devices"),
        ({"format": 1, "next_id": 1, "devices": []}, "devices"),
        ({"format": 1, "next_id": "1", "devices": {}}, "next_id"),
        ({"format": 1, "next_id": 2, "devices": {"d": 4}}, "reuse"),
    ],
)
def test_bad_assignments_json_is_refused(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ClusterAssignments.from_json(raw)
