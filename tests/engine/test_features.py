"""cifar_tune.engine.features: penultimate features, stratified sample, t-SNE of a trained model; the report's plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cifar_tune.engine import data as data_mod
from cifar_tune.engine import features
from cifar_tune.engine.augment import normalize
from cifar_tune.engine.models import build_model
from cifar_tune.engine.train import fit
from cifar_tune.spec.schema import DataSpec, SyntheticSpec

SYNTH = DataSpec(dataset="synthetic", val_fraction=0.2,
                 synthetic=SyntheticSpec(num_train=800, num_test=200, num_classes=4, image_size=16))


def test_penultimate_is_the_input_of_the_last_linear() -> None:
    torch.manual_seed(0)
    model = build_model({"family": "mlp", "hidden": [12, 6]}, num_classes=3, image_size=8)
    x = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5,) * 3, (0.25,) * 3
    with torch.no_grad():
        expected = model[:-1](normalize(x, mean, std))  # everything but the output layer
    got = features.penultimate(model, x, mean, std, batch_size=4)
    assert got.shape == (10, 6) and np.allclose(got, expected.numpy(), atol=1e-6)


def test_stratified_sample_keeps_class_proportions() -> None:
    y = np.repeat(np.arange(5), [400, 300, 200, 80, 20])
    idx = features.stratified_sample(y, 100, seed=1)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert np.bincount(y[idx]).tolist() == [40, 30, 20, 8, 2]
    assert len(features.stratified_sample(y[:50], 100)) == 50


def _knn_agreement(points: pd.DataFrame, k: int = 5) -> float:
    """Fraction of each point's k nearest 2-D neighbours that share its class."""
    xy, labels = points[["x", "y"]].to_numpy(), points["label"].to_numpy()
    dist = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    return float((labels[np.argsort(dist, axis=1)[:, :k]] == labels[:, None]).mean())


def test_trained_model_features_cluster_by_class(tmp_path: Path) -> None:
    """After a short training, images sit next to their own class in the 2-D map clearly more often than
    with the untrained model's features (the map shows what the model learned, not the pixels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and steady on a busy machine
    try:
        _cluster_check(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _cluster_check(tmp_path: Path) -> None:
    from cifar_tune.report import plot_feature_map
    from cifar_tune.results import Experiment

    info = data_mod.dataset_info(SYNTH)
    train, _ = data_mod.load_splits(SYNTH)
    test = data_mod.load_test(SYNTH)
    torch.manual_seed(0)
    cfg = {"family": "lenet", "channels": [8, 16], "padding": 2, "hidden": [32]}
    model = build_model(cfg, num_classes=4, image_size=16)
    untrained = _knn_agreement(features.feature_map(model, test, info))
    config = {"model": cfg, "optimizer": {"name": "adam", "lr": 3e-3}, "train": {"batch_size": 32}}
    fit(model, train, None, config, epochs=10, num_classes=4, mean=info.mean, std=info.std, device="cpu")
    exp = Experiment(str(tmp_path), "fm")
    assert features.write_feature_map(exp, model.state_dict(), config, info, test, trial_id="t0001", out=lambda s: None)
    points = exp.read_table(features.TSNE_TABLE)
    assert len(points) == len(test) and set(points["class"]) == set(info.classes)
    trained = _knn_agreement(points)
    assert trained > untrained + 0.1, (trained, untrained)  # chance: 0.25
    png = plot_feature_map(exp, points)
    assert exp.read_bytes(png).startswith(b"\x89PNG")
