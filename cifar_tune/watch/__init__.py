"""Watching a search: the trials dashboard and MLflow / W&B tracking."""
