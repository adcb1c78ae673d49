"""Adapting a restorer to a domain without ground truth (Kuai et al., WACV 2025): config, stages, gate, card.

`stages` holds the stage contract (`STAGES`, `run_adaptation`); each stage lives in its own module (`prepare`,
`targets` with the pseudo-target generator of `pseudo`, `tune`, `evaluate`, `card`); the work-dir layout is in
`workdir`, the checks a job must pass before any work in `checks`, the domain colour correction in `color`, the
quality gate in `gate`.
"""
