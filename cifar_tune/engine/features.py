"""Feature maps: a 2-D t-SNE of the penultimate-layer features of the retrained top model (seed 001).

``retrain`` (the one step that reads the test split) embeds a stratified sample of the test split with
the rank-1 config's first completed seed and stores the points in ``tsne.parquet``; ``report`` plots them,
coloured by class. The penultimate features are the input of the model's last ``nn.Linear`` (the
classifier), taken with a forward hook, so any family works. t-SNE is scikit-learn's (``pip install
'cifar-tune[report]'``); without it the step is skipped with a message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cifar_tune.engine.augment import normalize
from cifar_tune.engine.data import DatasetInfo, Split, _stratified_pick

TSNE_TABLE = "tsne.parquet"
MAX_POINTS = 1000  # t-SNE is O(n log n) per iteration; 1000 points take a few seconds on a CPU


@torch.no_grad()
def penultimate(model: nn.Module, x_uint8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                batch_size: int = 512) -> np.ndarray:
    """Inputs of the last Linear layer, [N, features], in eval mode."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("the model has no Linear layer to take penultimate features from")
    feats: list[torch.Tensor] = []
    handle = last[-1].register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach().flatten(1).float().cpu()))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for start in range(0, len(x_uint8), batch_size):
            model(normalize(x_uint8[start : start + batch_size].to(device), mean, std))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(feats).numpy()


def stratified_sample(y: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of up to ``max_points`` items with y's class proportions."""
    if len(y) <= max_points:
        return np.arange(len(y))
    return _stratified_pick(y, max_points, np.random.default_rng([seed, 3]))


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    n = len(features)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))  # must stay below the number of points
    # One thread: scikit-learn's OpenMP/BLAS pools next to torch's spin-wait badly on a busy machine
    # (measured 55 s vs 2.9 s for 200 points on the shared 2-core VM); 1000 points take seconds on one.
    with threadpool_limits(1):
        return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(features)


def feature_map(model: nn.Module, test: Split, info: DatasetInfo, *, max_points: int = MAX_POINTS,
                seed: int = 0) -> pd.DataFrame:
    """Columns ``x``, ``y`` (t-SNE), ``label``, ``class`` for a stratified sample of ``test``."""
    labels = test.y.cpu().numpy()
    idx = stratified_sample(labels, max_points, seed)
    feats = penultimate(model, test.x[torch.from_numpy(idx)], info.mean, info.std)
    xy = tsne_2d(feats, seed)
    return pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "label": labels[idx],
                         "class": [info.classes[k] for k in labels[idx]]})


def write_feature_map(exp: Any, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], info: DatasetInfo,
                      test: Split, *, trial_id: str, out: Callable[[str], Any] = print) -> bool:
    """Rebuild the retrained model, embed the test sample, store ``tsne.parquet``; False if skipped."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        out("feature map (t-SNE) skipped: scikit-learn is not installed (pip install 'cifar-tune[report]')")
        return False
    from cifar_tune.engine.models import build_model

    model = build_model(config["model"], num_classes=info.num_classes, in_channels=info.channels,
                        image_size=info.image_size)
    model.load_state_dict(state_dict)
    df = feature_map(model, test, info)
    df["trial_id"] = trial_id
    exp.write_table(TSNE_TABLE, df)
    out(f"feature map: t-SNE of {len(df)} test images ({trial_id}) -> {exp.uri(TSNE_TABLE)}")
    return True
