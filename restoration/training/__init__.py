"""Training: one toolkit and the loops built on it.

Toolkit: `state` (atomic, fsynced checkpoint save; the one load; RNG states), `ema`, `schedules` (learning rates),
`discriminators`, `losses`, `batches` (faces and pairs in memory, batch sampling, the restorer's damage).
Default models (`faceadapt train prior|restorer|export`): `recipes` (model configs and training configs), `runs`
(run folders: checkpoints, resume, warm start, logs), the loops `prior.train_prior` and `restorer.train_restorer`,
`evaluate` (metrics, samples and grids of trained models) and `export` (a run to the zoo).
Adaptation fine-tunes: `finetune.finetune` (SwinIR, GFPGAN and other restorers) and
`finetune_codeformer.finetune_codeformer`.
"""
