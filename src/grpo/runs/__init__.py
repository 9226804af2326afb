"""What a run leaves: its files, evaluation, diagnostics, the report, comparisons.

:mod:`~grpo.runs.layout` names a run directory's files; :mod:`~grpo.runs.samples` makes the lines of
samples.jsonl; :mod:`~grpo.runs.eval` scores a model on held-out prompts; :mod:`~grpo.runs.diagnostics`
finds warning signs in the metrics; :mod:`~grpo.runs.report` writes a run's report.html, with the page of
:mod:`~grpo.runs.page` and the plots of :mod:`~grpo.runs.plots`; :mod:`~grpo.runs.compare` runs and reports
`grpo compare`.
"""
