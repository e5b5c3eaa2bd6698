"""Helpers behind ``python -m vjepa_ray.tune``: the mask-ratio mapping, the search space, the results table."""
