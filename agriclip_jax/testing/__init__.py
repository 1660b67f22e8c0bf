"""Generated data, in one place: what the demo, the tests and the benchmarks train and evaluate on
when no real data is given. Nothing in the library's core imports it except the two entry points
that are for generated data: `data.source = "toy"` of the training config and the demo's
default (ALive-synth).

    synthetic.py   ALive-synth: procedurally rendered crop leaves, fish and livestock with
                   fine-grained conditions, disjoint downstream tasks, and the translation of
                   their metadata into ALive captions (`caption_metadata`)
    toy_data.py    in-process structured records for tiny training configs (`data.source="toy"`)
    bad_corpus.py  a corpus of broken files (truncated, wrong format, empty, huge, ...) with what
                   the input pipeline must say about each
"""
