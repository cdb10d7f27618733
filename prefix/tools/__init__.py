"""The commands people run on runs (`prefix status`, `report`, `sample`, `export`, `chaos`, `simulate`).

Nothing in the training daemon imports from here: `python -m prefix.train` runs without this package.
"""
