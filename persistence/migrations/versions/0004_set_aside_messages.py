"""Messages the database refused are set aside, not retried for ever; history by time is indexed

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.types.TypeEngine[object]:
    if op.get_bind().dialect.name in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        return mysql.DATETIME(fsp=6)  # type: ignore[return-value]
    return sa.DateTime(timezone=True)  # type: ignore[return-value]


def upgrade() -> None:
    op.create_table(
        "set_aside_messages",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("msg_id", sa.String(length=32), nullable=False),
        sa.Column("room", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.String(length=32), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_set_aside_messages")),
        sa.UniqueConstraint("msg_id", name=op.f("uq_set_aside_messages_msg_id")),
    )
    with op.batch_alter_table("set_aside_messages") as batch_op:
        batch_op.create_index(
            "ix_set_aside_messages_room_epoch_offset", ["room", "epoch", "offset"], unique=False
        )
    with op.batch_alter_table("messages") as batch_op:
        batch_op.create_index(
            "ix_messages_room_created_at_id", ["room", "created_at", "id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch_op:
        batch_op.drop_index("ix_messages_room_created_at_id")
    op.drop_table("set_aside_messages")
