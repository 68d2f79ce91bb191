# %% [markdown]
# # A tour of the Python API
#
# Runs in a few minutes on a laptop CPU: the built-in synthetic data set, tiny models, a handful of
# trials. Open it in Jupyter or VS Code (the `# %%` lines are cells), or run it as a script:
# `python docs/examples/api_tour.py`. `CIFAR_TUNE_TOUR_STORAGE` sets where the experiments go
# (default: a temporary directory).

# %%
import os
import tempfile
from pathlib import Path

import cifar_tune as ct
from cifar_tune.errors import SpecError

storage = os.environ.get("CIFAR_TUNE_TOUR_STORAGE") or tempfile.mkdtemp(prefix="cifar-tune-tour-")
num_cpus = int(os.environ.get("CIFAR_TUNE_TOUR_CPUS", "2"))
here = Path(tempfile.mkdtemp(prefix="cifar-tune-tour-specs-"))

# %% [markdown]
# ## A spec, from a dict (a YAML file works the same), with overrides
#
# Overrides are the CLI's `--set key=value`, as a list or a mapping. Every problem is reported at
# once, each with its key path; misspelled distributions get a suggestion.

# %%
spec_dict = {
    "name": "tour",
    "data": {"dataset": "synthetic", "synthetic": {"num_train": 600, "num_test": 200, "num_classes": 4, "image_size": 16}},
    "search": {
        "num_samples": 4, "max_concurrent": 2, "seed": 0,
        "scheduler": {"name": "asha", "max_epochs": 3, "grace_period": 1, "reduction_factor": 2},
    },
    "space": {
        "model": {"choice": [
            {"family": "lenet", "channels": [{"choice": [4, 8]}, 8], "padding": 2, "hidden": [16]},
            {"family": "mlp", "hidden": [{"choice": [16, 32]}]},
        ]},
        "optimizer": {"name": "sgd", "lr": {"loguniform": [1e-2, 2e-1]}, "momentum": 0.9},
        "schedule": {"name": "cosine"},
        "augment": {"hflip": True},
        "train": {"batch_size": 32},
    },
    "retrain": {"top": 1, "epochs": 2},
}
spec = ct.load_spec(spec_dict, {"search.num_samples": 3})
print(spec.name, spec.search.num_samples, "trials")

try:
    ct.load_spec(spec_dict, {"space.optimizer.lr": {"log_uniform": [1e-3, 1e-1]}, "search.num_smaples": 2})
except SpecError as e:
    print("\n".join(e.lines))

# %% [markdown]
# ## Search
#
# The same checks, output and files as `cifar-tune search`. Progress is one status line that is
# rewritten in place (in a notebook cell or a terminal; elsewhere at most one line per
# `progress_every_s`). Interrupting the kernel stops the trials cleanly; `exp.resume()` continues.

# %%
exp = ct.search(spec, storage=storage, num_cpus=num_cpus, dashboard=False, progress_every_s=5)
print(exp)

# %% [markdown]
# ## Results as DataFrames

# %%
trials = exp.trials  # trials.parquet
epochs = exp.epochs  # epochs.parquet
print(trials[["trial_id", "status", "epochs_run", "best_val_acc", "params"]])
print(epochs.groupby("trial_id").val_acc.max())
print(exp.best(2)[["rank", "trial_id", "best_val_acc"]])

# %% [markdown]
# ## Your own model
#
# `family: python` with `factory: module:attribute`; the module may sit next to the spec file. Its
# keyword arguments are hyperparameters like any other, constants or distributions.

# %%
(here / "my_nets.py").write_text('''
from torch import nn


class CNN7(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, *, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)
''')
mine = {**spec_dict, "name": "tour_mine",
        "space": {**spec_dict["space"], "model": {"family": "python", "factory": "my_nets:CNN7", "width": {"choice": [8, 16]}}}}
import yaml  # noqa: E402

(here / "mine.yaml").write_text(yaml.safe_dump(mine))
exp_mine = ct.search(here / "mine.yaml", storage=storage, num_cpus=num_cpus, dashboard=False, progress_every_s=5,
                     overrides={"search.num_samples": 2})
print(exp_mine.trials[["trial_id", "status", "config.model.width", "params", "best_val_acc"]])

# %% [markdown]
# ## Retrain the best, report, evaluate

# %%
retrained = exp.retrain(top=1, epochs=2, num_cpus=num_cpus)
print(retrained[["trial_id", "status", "test_acc"]])
print("report:", exp.report(out=lambda line: None))
for result in exp.evaluate(device="cpu"):
    print(f"top-1 {result.top1:.3f} on {result.num_images} test images")

# %% [markdown]
# ## Every experiment in the storage root

# %%
print(ct.list_experiments(storage)[["name", "trials", "completed", "stopped", "best_val_acc"]])
print("tour finished")
