"""The V-JEPA recipe in one process: objective, masks, schedules, optimizer, EMA and the training step.

Nothing here imports Ray or DeepSpeed; ``vjepa_ray.train`` runs this recipe on Ray Train and DeepSpeed.
"""
