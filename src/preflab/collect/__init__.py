"""`preflab collect`: the web app where people compare responses; their votes become training data."""
