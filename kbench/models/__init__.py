"""A model from a name: the registry of backbones (``backbones.get_backbone``,
``backbones.build_classifier``, ``backbones.load_model``, FLOP counts), kbench's weightless layers
(``layers``: preprocessing inside the graph) and random weights made tame for timing (``settle``).
"""
