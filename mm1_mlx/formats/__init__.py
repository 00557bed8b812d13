"""Checkpoint formats: pure config and weight mappings from other projects' layouts to ours.

One module per model family (``honeybee``, ``fastvlm``, ``aimv2``, ...): functions from a source's
``config.json`` dict to our configs and from its tensors to our keys. Nothing here reads files or
imports torch; the converters in ``convert/`` do the reading.
"""
