"""FX matchers on dynamo's graph that rewrite plain MoE code into the canonical ops.

One module per family: ``router``, ``dispatch`` (how tokens reach experts: one matcher per block
style), ``experts`` (the expert body) and ``combine`` (the weighted sum back to tokens); ``fx``
is the normalised node vocabulary they share, ``rewrite`` edits the graph, and ``graph_pass``
runs them all as Inductor's pre-grad pass.
"""
