"""Benchmarks: valve-id's hot paths measured side by side with their baselines.

Scripts, not timed tests. Each ``bench_<name>.py`` runs its contenders in one run on the same
inputs, interleaved round by round (a noisy neighbour then slows every contender alike),
and prints tables of medians and ratios against the targets in docs/PERFORMANCE.md. Run one with
``python -m benchmarks.bench_<name>`` or all with ``python -m benchmarks.run_all``; ``--quick``
is a seconds-long smoke run whose numbers mean nothing. docs/PERFORMANCE.md
holds the last measured tables and the machine they came from.
"""
