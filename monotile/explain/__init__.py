"""Seeing inside a model: what it costs (budget.py) and where it attends (maps.py)."""
