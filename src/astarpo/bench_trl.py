"""``python -m astarpo.bench_trl SPEC.json``: the module path of the bench's TRL rows before they moved to
:mod:`astarpo.bench.trl`, kept so that the command still works. It runs that module as ``__main__``, with the same
arguments."""

import runpy

if __name__ == "__main__":
    runpy.run_module("astarpo.bench.trl", run_name="__main__", alter_sys=True)
