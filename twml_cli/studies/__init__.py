"""The studies, one module each, every one in three steps (plus prepare, which loads and checks
its inputs before any run exists):

    inputs = study.prepare(settings)          # data, models; bad input raises TwmlError
    outcome = study.compute(inputs, hooks)    # pure: no MLflow, no console
    study.record(run, outcome)                # params, metrics, artifacts
    lines = study.summarize(outcome)          # what the console prints

runner.py runs them as the CLI does (MLflow runs, the console, twml reproduce).
"""
