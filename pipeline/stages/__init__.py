"""One module per stage; each exposes `run(params, args)` and writes only its declared outputs."""
