"""The decision core: data model, demand estimation, feasibility, scoring, explanations."""
