"""The study's report: ``report.write_report`` (report.md, results CSV/JSON), its plots
(``plots``) and ``compare.compare_runs`` for runs trained outside a study.
"""
