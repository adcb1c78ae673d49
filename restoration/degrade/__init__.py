"""Synthetic degradations of clean faces (`damage`: the random blur / downsample / noise / JPEG / colour-cast pipeline,
its presets and `degrade_batch`, the one batch version the restorer trainer uses; `broad`: two shuffled rounds with
colour noise and ringing, named damage types that can be held out, the bundled restorer's training damage).

The public surface of the subpackage: code outside `restoration` imports these names from here.
"""
from __future__ import annotations

from restoration.degrade.damage import (DegradationParams, DEFAULT, DOMAIN_SHIFT, CAMERA, SCAN, PRESETS,
                                        domain_shift_params, sample_degradation, apply_degradation, degrade,
                                        degrade_batch)
from restoration.degrade.broad import DAMAGE_TYPES, HELD_OUT, BroadDamage, DamageMix, broad_mix

__all__ = [
    "DegradationParams", "DEFAULT", "DOMAIN_SHIFT", "CAMERA", "SCAN", "PRESETS", "domain_shift_params",
    "sample_degradation", "apply_degradation", "degrade", "degrade_batch", "BroadDamage", "DAMAGE_TYPES", "HELD_OUT",
    "DamageMix", "broad_mix",
]
