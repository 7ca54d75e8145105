"""MySQL/MariaDB: timestamps with microseconds

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("users", "created_at"),
    ("items", "created_at"),
    ("items", "updated_at"),
    ("rooms", "created_at"),
    ("messages", "created_at"),
)


def upgrade() -> None:
    # Other backends already keep microseconds.
    if op.get_bind().dialect.name not in ("mysql", "mariadb"):
        return
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=mysql.DATETIME(fsp=6), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name not in ("mysql", "mariadb"):
        return
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=mysql.DATETIME(), existing_nullable=False)
