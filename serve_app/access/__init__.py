"""Access for many users: who is calling (keys, OIDC tokens), which models they may
use, how fast (limits that hold across replicas), and what they used (the ledger).

Replica side: ``steps`` (the pipeline's authenticate / authorize / admit / account
steps) and ``client`` (the replica's cached keys, allowances and unsent usage, synced
with the head in the background).  Head side: ``ledger`` (one Serve replica on the
head) over ``store`` (SQLite: hashed keys and the usage ledger), which the
``hpcserve keys`` / ``hpcserve usage`` commands use too.
"""
