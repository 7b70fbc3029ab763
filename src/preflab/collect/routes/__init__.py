"""One router per resource: pairs (the next pair), votes (and stats), authored comparisons, admin, pages."""
