"""jaxnas: neural architecture search where a whole population of candidates is one jit-compiled JAX program.

``jaxnas.load_model(run_folder)`` loads the best model a search exported (see `jaxnas.search.export`); a language
model's (space.name=lm) continues text: ``jaxnas.load_model(run).generate("def ", 40)``.
"""


def __getattr__(name):
    # Lazy, so `import jaxnas.data` (the data smoke check) does not pay for the whole search stack.
    if name == "load_model":
        from jaxnas.search.export import load_model

        return load_model
    raise AttributeError(f"module 'jaxnas' has no attribute {name!r}")
