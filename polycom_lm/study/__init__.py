"""Studies of activations, end to end.

    spec.py          study files (base config, grid of dotted keys, per-value overrides, select_lr) → StudySpec
    grid.py          the study → named runs with resolved configs (and the LR sweep's runs)
    lr_selection.py  each variant's learning rate from the sweep's validation losses
    runner.py        running the runs one after another (local / torchrun), restartable
    slurm.py         SLURM job-array scripts, one task per run
    runs.py          reading run and study folders for reports
    statistics.py    means ± standard deviations over seeds, differences to the SwiGLU baseline
    plots.py         the report's figures
    report.py        `compare`: report.md + report.json + figures
    analysis.py      the paper's analyses: effective rank of FFN weights, layer-wise cosine similarity
"""
