"""Evaluation helpers behind ``python -m vjepa_ray.evaluate``: encoding views, label subsets, probe banks."""
