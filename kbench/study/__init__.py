"""The whole study in one resumable command: the study TOML (``config.load_config``),
``study.run_study`` (train, export, time, ensemble, submit, report), each model's stages, reused when
unchanged (``stages``), and where its backbone entries run (``executors``: in turn, or as Ray tasks).
"""
