"""The shared ground every stage stands on: one-line errors (``errors.KbenchError``), strict
configs (``config``), atomic files (``files``), metrics, tables, the one timing loop (``timing``),
what this machine is (``machine``), the Keras backend choice (``backend``), a quiet terminal
(``quiet``) and how a kbench process starts and stops (``process``). Imports nothing of kbench above it.
"""
