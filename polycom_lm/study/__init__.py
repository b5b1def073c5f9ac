"""Studies of activations, end to end.

    keys.py          checking study files' keys against the config schema (one-line errors)
    spec.py          study files (base config, grid of dotted keys, per-value overrides, select_lr) → StudySpec
    ladder.py        scaling ladders: the size (and budget) axes and the per-size rules (LR, batch, warmup, schedule)
    grid.py          the study → named runs with resolved configs (and the LR sweep's runs)
    lr_selection.py  each variant's learning rate from the sweep's validation losses
    runner.py        running the runs one after another (local / torchrun), restartable
    slurm.py         SLURM job-array scripts, one task per run
    runs.py          reading run and study folders for reports
    statistics.py    means ± standard deviations over seeds, differences to the SwiGLU baseline
    plots.py         the report's figures
    report.py        `compare`: report.md + report.json + figures
    fits.py          scaling-law fits (numpy + scipy): L(C), L(N, D), compute multipliers
    ladder_analysis.py  a ladder's runs → points, fits, multipliers, paired bootstrap over seeds, held-out check
    ladder_report.py, ladder_plots.py   the ladder's report sections and figures
    analysis.py      the paper's analyses: effective rank of FFN weights, layer-wise cosine similarity
"""
