"""``stratavit ablate``: an equal-budget comparison of recipes over seeds, as one resumable command.

* :mod:`~stratavit.ablation.plan`: the plan (recipes × seeds, the budget, the overrides, the evaluation);
* :mod:`~stratavit.ablation.folder`: the ablation folder, its state file, refusing a changed plan;
* :mod:`~stratavit.ablation.run`: orchestration (train, evaluate, collect, report), resumable;
* :mod:`~stratavit.ablation.collect` / :mod:`~stratavit.ablation.metrics`: the numbers of each run;
* :mod:`~stratavit.ablation.stats` / :mod:`~stratavit.ablation.tdist`: intervals and verdicts;
* :mod:`~stratavit.ablation.report` / :mod:`~stratavit.ablation.plot`: table, CSV, JSON and plot.

Only the lightweight parts are imported here; :func:`stratavit.ablation.run.ablate` loads torch.
"""
