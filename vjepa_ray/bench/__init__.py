"""Performance figures: ``python -m vjepa_ray.bench FIGURE [options]``.

Each figure lives in its own module of this package and exposes ``add_arguments(parser)`` and
``run(args) -> dict``. The dict is printed as one JSON object on the last line of output. Every
figure carries its baseline, measured in the same run, so that ratios (not absolute times, which
shared machines make noisy) are what a reader compares.
"""
