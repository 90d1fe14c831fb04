"""Stage 1a: which decoder layers general competence rests on (layers.py: the methods and the result file; mask.py;
runtime.py: plain or ZeRO-3 models), a probe corpus the model writes itself (corpus.py), and choosing k (auto_k.py).

`from adept_ds.probe import X`, the path of the former module adept_ds/probe.py, keeps working for one release."""


def __getattr__(name: str):
    # Looked up only for names not found otherwise (PEP 562): the submodules stay unimported until asked for.
    from adept_ds.probe import layers, runtime

    for module in (layers, runtime):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'adept_ds.probe' has no attribute {name!r}")
