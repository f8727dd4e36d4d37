"""The benchmark harness (see issue: the main job as a product)."""
