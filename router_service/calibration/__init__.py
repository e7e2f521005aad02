"""`tollway calibrate`: score the pool's own models on a labelled set and write a routing history.

Modules: `dataset` (calibration sets: JSONL lines validated with pydantic; the built-in sets),
`graders` (pure graders: exact, choice, number, regex; the judge's prompt and verdict), `client`
(the OpenAI API: answers with true usage, the judge), `journal` (every graded answer, for
resuming), `runner` (bounded concurrency, giving up on dead backends), `report` (the history and
the summary), `builtin` (how the shipped sets are derived from RouterBench), `cli`.
"""
