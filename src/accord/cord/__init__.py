"""CoRD — collaborative step-wise multi-teacher decoding (paper 002, §3–§5).

- ``segment``: how a teacher's output is cut into steps (prompt-guided or by delimiters);
- ``score``: step scorers (the meta-prover's predictive perplexity of the gold answer, and the baselines);
- ``decode``: beam search over teachers' proposed steps, MCTS, curation;
- ``integration``: the integration baseline's prompt (Table 17) and its JSON answer;
- ``stage``: ``accord cord`` — every problem, the store, the corpora, the summary (``stage.run``).

The hit-rate analysis (Fig. 2) lives in ``accord.analysis.cord``.
"""
