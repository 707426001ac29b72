"""`genadapter bench`: what absorbing context into parameters costs and saves, measured side by
side in one process (docs/BENCHMARKS.md).

Modules:
    run.py      the whole run and its report; parts 1-4 (absorb, decode, against prompting,
                batches), the sizes
    library.py  part 5: decoding routed over an adapter library against one state
    memory.py   part 6: the context memory's bytes, decode and time to first token
    kit.py      what every part shares: the clock, generated prose, timed greedy decoding"""
