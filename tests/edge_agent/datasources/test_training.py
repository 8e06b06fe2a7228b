"""Memory-mapped data from the cache trains the digits bundle exactly like the same data in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.datasources import open_data, parse_data_config
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from fedflock.datasets import load_digits_arrays


def test_one_epoch_on_a_memory_mapped_csv_split_matches_in_memory_training(
    digits_bundle: Bundle, tmp_path: Path
) -> None:
    x, y = load_digits_arrays()
    rows = np.column_stack([y, (x.reshape(len(x), 64) * 16).astype(np.int64)])
    header = "digit," + ",".join(f"p{i}" for i in range(64))
    np.savetxt(tmp_path / "digits.csv", rows, fmt="%d", delimiter=",", header=header, comments="")
    table = {"kind": "csv", "path": "digits.csv", "label_column": "digit", "feature_shape": [1, 8, 8]}
    config = parse_data_config(table | {"val_fraction": 0.2, "seed": 3}, base_dir=tmp_path)
    split = open_data(config, cache_dir=tmp_path / "cache")
    train, validation = split.train, split.validation
    assert validation is not None and isinstance(train.x, np.memmap) and isinstance(validation.x, np.memmap)
    assert len(train) + len(validation) == len(x) and abs(len(validation) / len(x) - 0.2) < 0.05

    trainer = OrtTrainer.open(digits_bundle)
    start = digits_bundle.initial_weights()
    mapped = trainer.train(start, train.x, train.y, epochs=1, batch_size=32, lr=0.05, rng=np.random.default_rng(0))
    in_memory = trainer.train(
        start, np.array(train.x), np.array(train.y), epochs=1, batch_size=32, lr=0.05, rng=np.random.default_rng(0)
    )
    assert mapped.num_examples == len(train) and np.isfinite(mapped.loss)
    assert any(not np.array_equal(value, start[name]) for name, value in mapped.weights.items())
    for name, value in mapped.weights.items():
        np.testing.assert_array_equal(value, in_memory.weights[name])
    evaluation = trainer.evaluate(mapped.weights, validation.x, validation.y)
    assert evaluation.num_examples == len(validation) and evaluation.accuracy > 0.5
