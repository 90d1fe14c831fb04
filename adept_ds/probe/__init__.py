"""Stage 1a: which decoder layers general competence rests on (layers.py: the methods and the result file; mask.py;
runtime.py: plain or ZeRO-3 models), a probe corpus the model writes itself (corpus.py), and choosing k (auto_k.py).

`from adept_ds.probe import X`, the path of the former module adept_ds/probe.py, keeps working for one release."""

import importlib


def __getattr__(name: str):
    # Asked only for names the package lacks (PEP 562): its submodules stay unimported until a name is wanted.
    if not name.startswith("__"):
        for module in ("layers", "runtime"):
            found = importlib.import_module(f"{__name__}.{module}")
            if hasattr(found, name):
                return getattr(found, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
