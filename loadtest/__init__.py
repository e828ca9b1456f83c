"""Load-test harness for slotproxy: `python -m loadtest`.

Runs asyncpg clients (bounded in count and time) against several targets
side by side, in scenarios modelled on the incidents that exhaust
PostgreSQL's connection slots, and measures slotproxy against the direct
connection and PgBouncer. See the README's "Load-test harness" section.
"""
