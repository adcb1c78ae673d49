"""The v1 routes, one module per resource (health, restore, datasets, adaptations, models)."""
