"""Alembic's environment for our revisions (storage/migrations.py runs it).

It migrates on the connection it is handed, inside that connection's transaction, and keeps
its version in ``evomerge_alembic_version`` (Optuna's alembic state is ``alembic_version``).
"""

from alembic import context

from evomerge.storage.migrations import VERSION_TABLE

context.configure(connection=context.config.attributes["connection"], version_table=VERSION_TABLE,
                  render_as_batch=True)
context.run_migrations()
