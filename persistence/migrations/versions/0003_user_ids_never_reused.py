"""users: ids never reused (SQLite AUTOINCREMENT) and a token version

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _recreate_sqlite_users(autoincrement: bool, add: bool) -> None:
    """SQLite can only gain or lose AUTOINCREMENT by rebuilding the table (batch mode).

    Rebuilding drops the old table; with foreign keys on, that drop would first delete every
    user and so cascade to their items and memberships. The pragma only changes outside a
    transaction, which is where Alembic's first statement of a run is; if it did not take, the
    migration refuses rather than lose rows.
    """
    bind = op.get_bind()
    bind.exec_driver_sql("PRAGMA foreign_keys=OFF")
    enforced = bind.exec_driver_sql("PRAGMA foreign_keys").scalar()
    users = bind.exec_driver_sql("SELECT count(*) FROM users").scalar()
    if enforced and users:
        raise RuntimeError(
            "migration 0003 rebuilds the users table and needs foreign keys off: run "
            "`collab migrate` on its own (not in one transaction with other changes)"
        )
    with op.batch_alter_table(
        "users", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
    ) as batch:
        if add:
            batch.add_column(
                sa.Column("token_version", sa.Integer(), server_default="0", nullable=False)
            )
        else:
            batch.drop_column("token_version")
    bind.exec_driver_sql("PRAGMA foreign_keys=ON")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _recreate_sqlite_users(autoincrement=True, add=True)
        return
    # PostgreSQL sequences and MySQL/MariaDB AUTO_INCREMENT never hand an id out twice.
    op.add_column(
        "users", sa.Column("token_version", sa.Integer(), server_default="0", nullable=False)
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _recreate_sqlite_users(autoincrement=False, add=False)
        return
    op.drop_column("users", "token_version")
