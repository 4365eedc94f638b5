"""The robustness study's shared pieces, used by the ``experiments/robustness_*.py`` scripts.

- :mod:`robustness.protocol`: config loading, the benchmarks' splits and cue regions, the model,
  training (baseline and fine-tuning arms), evaluation and summaries;
- :mod:`robustness.study`: the study's run (every benchmark, method, seed and sweep; the gains);
- :mod:`robustness.faithfulness`: where a model's maps put relevance against what it reads;
- :mod:`robustness.baselines`: the comparison over several baselines (study reuse, summaries);
- :mod:`robustness.mechanism`: where a fine-tuned model still reads the cue (rule variants, path
  patching, value flow, the value-bias gauge);
- :mod:`robustness.plots`: every figure of the three scripts.

The scripts put their own folder (``experiments/``) on ``sys.path``, so this package imports as
``robustness``; tests prepend ``experiments/`` to ``sys.path`` the same way.
"""
