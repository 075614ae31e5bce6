"""The command line: click commands (``main.main``) that parse options (``options``, built from
the config dataclasses), call one library function and print its result (``summaries``); ``doctor``
and the study's commands (``study``). Nothing below imports it.
"""
