"""Fuzzing the parsers that read what tenants (and operators) send.

One harness module per target (`harness_<target>.py`), each with the same three names:

    INSTRUMENT        packages whose Python code atheris instruments for coverage (sdserve, ...)
    MODULES           the modules it exercises, imported under that instrumentation
    setup(workdir)    one-time preparation: base-model targets, registered stand-in files
    one_input(data)   run one input; raise anything that is not an `SdserveError`

`run.py` runs a harness under atheris (libFuzzer) in a subprocess (`worker.py`) for a bounded
time, seeded by `seeds.py`; `test_fuzz.py` runs each briefly in `make test` and for a minute
under the `slow` marker; `test_regressions.py` keeps every input that ever crashed one.
"""
