"""Ray orchestration: the driver, the Ray Data stream builders, the preprocess stage.

The only package outside actors/ that imports ray; it may import actors/. The core (the rest of
pipeline/) never imports it.
"""
