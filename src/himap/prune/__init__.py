"""Pruning: schedules of stages (schedule), token sets S/V/I (tokens), ranking criteria
(criteria), the engine that attaches a schedule to an unmodified model (engine) and the
per-family adapters (adapters). Imports nothing else of himap."""
