"""`slimc search`: per-block compression levels chosen by an evolutionary search under a budget.

`slimc.search()` (`slimc.evosearch.api.search`) is the entry point; `budget` parses budgets,
`space` turns a genome of per-block levels into pass pipelines, `fitness` scores candidates,
`evolve` searches, `workers` runs evaluations in process or on Ray, `report` writes the report.
"""
