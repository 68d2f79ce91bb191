"""cifar-tune: declarative hyperparameter and architecture search for CIFAR-style classification."""

__version__ = "0.1.0"
