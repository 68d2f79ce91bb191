"""The search spec: YAML -> frozen, validated dataclasses; the search space and what a trial searched."""
