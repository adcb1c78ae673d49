"""Synthetic degradations of clean faces (`damage`: the random blur / downsample / noise / JPEG / colour-cast pipeline,
its presets and `degrade_batch`, the one batch version the restorer trainer uses)."""
