"""Outbound: the outbox pump, per-number lanes, the retry policy, pacing and the `Sender` facade.

Nothing is imported here, so importing one part never drags in the rest (no import cycles).
"""
