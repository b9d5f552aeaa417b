"""job specs and job events are stored as the trainer's own JSON, not as serialized protos

The trainer's core works on domain models (services/trainer/domain.py); the store keeps them
as JSON columns it owns. Existing rows are converted through the wire types they were written
in: jobs.spec (a serialized JobSpec) becomes its JobSpec model's JSON, job_events.data (a
serialized JobEvent) becomes job_events.event. The downgrade converts back.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("spec", sa.LargeBinary), sa.column("spec_json", sa.JSON))
events = sa.table(
    "job_events",
    sa.column("job_id", sa.String),
    sa.column("seq", sa.Integer),
    sa.column("data", sa.LargeBinary),
    sa.column("event", sa.JSON),
)


def _converters():
    from services.common.protoconv import from_proto, to_proto
    from services.trainer.domain import JobEvent, JobSpec
    from tunedock.v1 import trainer_pb2

    return from_proto, to_proto, JobSpec, JobEvent, trainer_pb2


def upgrade() -> None:
    from_proto, _, JobSpec, JobEvent, pb = _converters()
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("spec_json", sa.JSON(), nullable=True))
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("event", sa.JSON(), nullable=True))
    bind = op.get_bind()
    for job_id, spec in bind.execute(sa.select(jobs.c.id, jobs.c.spec)).all():
        converted = from_proto(JobSpec, pb.JobSpec.FromString(bytes(spec))).model_dump(mode="json")
        bind.execute(jobs.update().where(jobs.c.id == job_id).values(spec_json=converted))
    for job_id, seq, data in bind.execute(sa.select(events.c.job_id, events.c.seq, events.c.data)).all():
        event = from_proto(JobEvent, pb.JobEvent.FromString(bytes(data))).model_dump(mode="json", exclude_none=True)
        bind.execute(events.update().where((events.c.job_id == job_id) & (events.c.seq == seq)).values(event=event))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("spec")
        batch.alter_column("spec_json", new_column_name="spec", existing_type=sa.JSON(), nullable=False)
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("data")
        batch.alter_column("event", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    _, to_proto, JobSpec, JobEvent, pb = _converters()
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("spec", new_column_name="spec_json", existing_type=sa.JSON(), nullable=True)
        batch.add_column(sa.Column("spec", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("data", sa.LargeBinary(), nullable=True))
    bind = op.get_bind()
    for job_id, spec in bind.execute(sa.select(jobs.c.id, jobs.c.spec_json)).all():
        raw = to_proto(JobSpec.model_validate(spec), pb.JobSpec()).SerializeToString()
        bind.execute(jobs.update().where(jobs.c.id == job_id).values(spec=raw))
    for job_id, seq, event in bind.execute(sa.select(events.c.job_id, events.c.seq, events.c.event)).all():
        raw = to_proto(JobEvent.model_validate(event), pb.JobEvent()).SerializeToString()
        bind.execute(events.update().where((events.c.job_id == job_id) & (events.c.seq == seq)).values(data=raw))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("spec_json")
        batch.alter_column("spec", existing_type=sa.LargeBinary(), nullable=False)
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("event")
        batch.alter_column("data", existing_type=sa.LargeBinary(), nullable=False)
