"""Shapes world: the synthetic scenes our own models are trained and evaluated on.

``world`` draws scenes and writes their captions, questions and documents; ``redraw`` draws the
same scenes with other code (a robustness check); ``tokenizer`` trains the small BPE tokenizer;
``train`` is the from-scratch recipe (encoder, pre-training, SFT) and ``eval`` scores a model.
The library core never imports this package; the command lines do.
"""
