"""A trained model: ``train.train`` fits one backbone from a ``config.TrainConfig`` (the recipe's
phases and schedule in ``recipe``, several devices in ``devices``, several processes in
``distributed``, the epoch clock and stop requests in ``epochs``), ``ensemble.train_ensemble`` stacks
or averages trained runs, and ``runs.Run`` is the run folder's one owner (file names, lock, reads,
atomic writes); ``curves`` draws its training curves.
"""
